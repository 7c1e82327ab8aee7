// The emulator's launcher: `kernels.cu` compiled as C++ (with `emu.h` force-included), and
// `emu_launch`, which runs a kernel by name over a grid with CUDA's `cuLaunchKernel` argument
// convention (`params[i]` points at the i-th argument's value).
//
// A launch creates one OS thread per thread of a block; each thread runs every block in order
// (x fastest, then y, then z) and waits at an end-of-block barrier, so one block is live at a time.
// Launches are serialized by a global mutex (static `__shared__` arrays are per-block only then).

#include "kernels.cu"

#include <cstddef>
#include <thread>
#include <utility>
#include <vector>

namespace {

template <class... A, std::size_t... I>
void emu_call(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<A*>(params[I])...);
}

template <class... A>
void emu_invoke(void (*f)(A...), void** params) {
    emu_call(f, params, std::index_sequence_for<A...>{});
}

// One character per parameter: 'p' pointer, 'i' int, 'l' long long, 'f' float.
template <class T>
struct EmuSig;
template <class T>
struct EmuSig<T*> {
    static constexpr char c = 'p';
};
template <>
struct EmuSig<int> {
    static constexpr char c = 'i';
};
template <>
struct EmuSig<long long> {
    static constexpr char c = 'l';
};
template <>
struct EmuSig<float> {
    static constexpr char c = 'f';
};

template <class... A>
const char* emu_signature_of(void (*)(A...)) {
    static const char sig[] = {EmuSig<A>::c..., '\0'};
    return sig;
}

struct EmuEntry {
    const char* name;
    void (*run)(void**);
    const char* (*signature)();
};

#define EMU_ENTRY(k) \
    EmuEntry{#k, [](void** p) { emu_invoke(&k, p); }, []() { return emu_signature_of(&k); }},
const EmuEntry EMU_TABLE[] = {EMU_KERNELS(EMU_ENTRY)};
#undef EMU_ENTRY

const EmuEntry* emu_find(const char* name) {
    for (const EmuEntry& e : EMU_TABLE) {
        if (std::strcmp(e.name, name) == 0) return &e;
    }
    return nullptr;
}

std::mutex emu_launch_mutex;

}  // namespace

// The parameter signature of kernel `name` ('p' pointer, 'i' int, 'l' long long, 'f' float), or
// null for an unknown name.
extern "C" const char* emu_signature(const char* name) {
    const EmuEntry* e = emu_find(name);
    return e ? e->signature() : nullptr;
}

// Runs kernel `name` over grid (gx, gy, gz) of blocks (bx, by, bz) with `shared_bytes` of dynamic shared
// memory; returns 0, 1 for an unknown name, 2 for an empty or oversized geometry.
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned shared_bytes, void** params) {
    const EmuEntry* e = emu_find(name);
    if (!e) return 1;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (threads == 0 || threads > 1024 || gx == 0 || gy == 0 || gz == 0) return 2;
    std::lock_guard<std::mutex> guard(emu_launch_mutex);
    EmuBlock block((unsigned)threads, shared_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = EmuDim3{t % bx, (t / bx) % by, t / (bx * by)};
            blockDim = EmuDim3{bx, by, bz};
            gridDim = EmuDim3{gx, gy, gz};
            emu_block = &block;
            for (unsigned z = 0; z < gz; ++z) {
                for (unsigned y = 0; y < gy; ++y) {
                    for (unsigned x = 0; x < gx; ++x) {
                        blockIdx = EmuDim3{x, y, z};
                        e->run(params);
                        block.finish(t / 32);
                    }
                }
            }
            emu_block = nullptr;
        });
    }
    for (std::thread& t : pool) t.join();
    return 0;
}
