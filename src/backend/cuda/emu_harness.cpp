// The emulator's launcher: `kernels.cu` compiled as C++ (with `emu.h` force-included), and
// `emu_launch`, which runs a kernel by name over a grid with CUDA's `cuLaunchKernel` argument
// convention (`params[i]` points at the i-th argument's value).
//
// A launch runs the blocks in order (x fastest, then y, then z) on the calling OS thread, each block's
// threads as fibers (see emu.h) switched by a round-robin scheduler: a fiber runs until it returns or
// waits at a barrier; the scheduler resumes it once the barrier has passed. Launches are serialized by a
// global mutex (static `__shared__` arrays are per-block only then).

#include "kernels.cu"

#include <sys/mman.h>

#include <cstddef>
#include <mutex>
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

// Fiber stacks, kept from launch to launch (grown to the largest block): each EMU_STACK bytes above a
// guard page, so an overflow faults instead of corrupting a neighbour. Pages are committed on first use.
constexpr size_t EMU_PAGE = 4096, EMU_STACK = 512 * 1024;
struct EmuStacks {
    unsigned char* base = nullptr;
    unsigned count = 0;
    unsigned char* stack(unsigned i) const { return base + (size_t)i * (EMU_STACK + EMU_PAGE) + EMU_PAGE; }
    bool reserve(unsigned n) {
        if (n <= count) return true;
        if (base) munmap(base, (size_t)count * (EMU_STACK + EMU_PAGE));
        const size_t bytes = (size_t)n * (EMU_STACK + EMU_PAGE);
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            base = nullptr;
            count = 0;
            return false;
        }
        base = static_cast<unsigned char*>(p);
        count = n;
        for (unsigned i = 0; i < n; ++i) mprotect(stack(i) - EMU_PAGE, EMU_PAGE, PROT_NONE);
        return true;
    }
};
EmuStacks emu_stacks;

// What the fibers of the running launch run.
const EmuEntry* emu_entry = nullptr;
void** emu_params = nullptr;

void emu_fiber_main() {
    emu_entry->run(emu_params);
    // A thread's committed cp.async copies complete even if it never waited for them.
    emu_cp_async_wait(0);
    emu_cur->cp_open.clear();
    emu_block->finish(threadIdx.x / 32);
    emu_cur->done = true;
    // Returning resumes the scheduler (uc_link).
}

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
    if (!emu_stacks.reserve((unsigned)threads)) {
        std::fprintf(stderr, "emulator: cannot map %llu fiber stacks\n", threads);
        std::abort();
    }
    EmuBlock block((unsigned)threads, shared_bytes);
    std::vector<EmuFiber> fibers(threads);
    ucontext_t sched, tmpl;
    getcontext(&tmpl);
    emu_entry = e;
    emu_params = params;
    emu_block = &block;
    emu_sched = &sched;
    blockDim = EmuDim3{bx, by, bz};
    gridDim = EmuDim3{gx, gy, gz};
    for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = EmuDim3{x, y, z};
                block.next_block();
                for (unsigned t = 0; t < threads; ++t) {
                    EmuFiber& f = fibers[t];
                    f.wait = 0;
                    f.done = false;
                    f.ctx = tmpl;
                    f.ctx.uc_stack.ss_sp = emu_stacks.stack(t);
                    f.ctx.uc_stack.ss_size = EMU_STACK;
                    f.ctx.uc_link = &sched;
                    makecontext(&f.ctx, emu_fiber_main, 0);
                }
                for (unsigned left = (unsigned)threads; left > 0;) {
                    bool ran = false;
                    for (unsigned t = 0; t < threads; ++t) {
                        EmuFiber& f = fibers[t];
                        if (f.done || !block.ready(f, t)) continue;
                        f.wait = 0;
                        threadIdx = EmuDim3{t % bx, (t / bx) % by, t / (bx * by)};
                        emu_cur = &f;
                        swapcontext(&sched, &f.ctx);
                        ran = true;
                        if (f.done) --left;
                    }
                    if (!ran) {
                        std::fprintf(stderr, "emulator: %s block (%u, %u, %u): every running thread waits at a barrier "
                                     "the others never reach (a deadlock on a GPU)\n",
                                     name, x, y, z);
                        std::abort();
                    }
                }
            }
        }
    }
    emu_block = nullptr;
    emu_cur = nullptr;
    emu_sched = nullptr;
    return 0;
}
