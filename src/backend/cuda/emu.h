// CPU emulation of the CUDA C++ subset `kernels.cu` uses, force-included by the emulator's build
// (`g++ -DFAST_LLM_EMU -include emu.h`).
//
// Model: a launch runs one block at a time on the calling OS thread; the block's threads are fibers
// (ucontext: each its own stack), run in turn by the harness's scheduler (emu_harness.cpp) until each
// returns or waits at a barrier. Hence:
// * `__shared__` is `static`: with one block live at a time a function-static array is that block's
//   shared memory (launches are serialized by a global mutex).
// * `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are thread_local globals the scheduler sets before
//   it resumes a fiber.
// * `__syncthreads()` is a barrier over the block's threads that are still running the kernel: a
//   thread that has returned leaves the block, and the others still meet. A block whose every live
//   thread waits at a barrier that cannot pass stops the emulator (a deadlock on a GPU).
// * Warp collectives (`__shfl_xor_sync`, the `mma.sync` of `kernels.cu` through `emu_mma16816`):
//   each lane publishes its registers in the block's exchange area, meets its warp at `__syncwarp`,
//   reads what it needs, and meets it again before the area is reused.
// * `__nv_bfloat16` is 16 bits with round-to-nearest-even conversion from float (NaN kept, quieted),
//   like `__float2bfloat16` and the `half` crate.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
#include <new>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct EmuDim3 {
    unsigned x, y, z;
};
inline thread_local EmuDim3 threadIdx{0, 0, 0};
inline thread_local EmuDim3 blockIdx{0, 0, 0};
inline thread_local EmuDim3 blockDim{1, 1, 1};
inline thread_local EmuDim3 gridDim{1, 1, 1};

// cp.async copies of one GPU thread (see `emu_cp_async`).
struct EmuCopy {
    void* dst;
    const void* src;
    unsigned bytes;
};

// A GPU thread of the block being run: a fiber with its context, what it waits for, and its cp.async
// groups.
struct EmuFiber {
    ucontext_t ctx;
    // 0: runnable; 1: at the block barrier, 2: at its warp's barrier, until generation `gen` has passed.
    unsigned wait = 0;
    unsigned long long gen = 0;
    bool done = false;
    std::vector<EmuCopy> cp_open;
    std::vector<std::vector<EmuCopy>> cp_groups;
};

inline thread_local ucontext_t* emu_sched = nullptr;  // the scheduler's context
inline thread_local EmuFiber* emu_cur = nullptr;      // the fiber running

// Back to the scheduler, which resumes this fiber once what it waits for has happened.
inline void emu_yield() { swapcontext(&emu_cur->ctx, emu_sched); }

// The barriers of the block being run (one per launch, reset block after block).
struct EmuBlock {
    unsigned size;           // threads per block
    unsigned active;         // threads still inside the kernel for the current block
    unsigned arrived = 0;    // threads waiting at the current __syncthreads
    unsigned long long generation = 0;
    // Per warp (32 consecutive threads): threads still inside the kernel, waiting at __syncwarp, and
    // the barrier's generation.
    std::vector<unsigned> warp_active, warp_arrived;
    std::vector<unsigned long long> warp_generation;
    // Registers each thread publishes to its warp in a warp collective (shuffle, mma.sync).
    static constexpr unsigned XCH = 12;
    std::vector<uint32_t> xch;
    // The launch's dynamic shared memory (`extern __shared__`), 128-byte aligned, reused block after block.
    static constexpr std::align_val_t DYN_ALIGN{128};
    size_t dyn_bytes;
    unsigned char* dyn;

    EmuBlock(unsigned n, size_t shared_bytes)
        : size(n), active(n), warp_active(warp_sizes(n)), warp_arrived((n + 31) / 32, 0),
          warp_generation((n + 31) / 32, 0), xch((size_t)n * XCH, 0), dyn_bytes(shared_bytes),
          dyn(shared_bytes ? static_cast<unsigned char*>(::operator new(shared_bytes, DYN_ALIGN)) : nullptr) {}
    ~EmuBlock() {
        if (dyn) ::operator delete(dyn, DYN_ALIGN);
    }
    EmuBlock(const EmuBlock&) = delete;
    EmuBlock& operator=(const EmuBlock&) = delete;

    static std::vector<unsigned> warp_sizes(unsigned n) {
        std::vector<unsigned> w((n + 31) / 32, 32);
        if (n % 32) w.back() = n % 32;
        return w;
    }

    // __syncwarp: wait until every thread of the caller's warp still in the kernel has arrived.
    void sync_warp(unsigned warp) {
        const unsigned long long gen = warp_generation[warp];
        if (++warp_arrived[warp] == warp_active[warp]) {
            warp_arrived[warp] = 0;
            ++warp_generation[warp];
            return;
        }
        emu_cur->wait = 2;
        emu_cur->gen = gen;
        emu_yield();
    }

    // __syncthreads: wait until every thread still in the kernel has arrived.
    void sync() {
        const unsigned long long gen = generation;
        if (++arrived == active) {
            arrived = 0;
            ++generation;
            return;
        }
        emu_cur->wait = 1;
        emu_cur->gen = gen;
        emu_yield();
    }

    // Whether thread t (fiber f) may run: it waits for nothing, or its barrier has passed.
    bool ready(const EmuFiber& f, unsigned t) const {
        if (f.wait == 0) return true;
        return (f.wait == 1 ? generation : warp_generation[t / 32]) != f.gen;
    }

    // The calling thread has returned from the kernel for this block: it leaves the barriers,
    // releasing the others if they were only waiting for it.
    void finish(unsigned warp) {
        --active;
        if (arrived > 0 && arrived == active) {
            arrived = 0;
            ++generation;
        }
        --warp_active[warp];
        if (warp_arrived[warp] > 0 && warp_arrived[warp] == warp_active[warp]) {
            warp_arrived[warp] = 0;
            ++warp_generation[warp];
        }
    }

    // Every thread back for the next block.
    void next_block() {
        active = size;
        arrived = 0;
        warp_active = warp_sizes(size);
        for (unsigned& a : warp_arrived) a = 0;
    }
};

inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->sync(); }

// The block's dynamic shared memory, of which the kernel uses `need` bytes: a launch that gave fewer
// stops the emulator loudly (on a GPU the access would fault).
inline unsigned char* emu_dynamic_shared(size_t need) {
    if (need > emu_block->dyn_bytes) {
        std::fprintf(stderr, "dynamic shared memory: the kernel uses %zu bytes, the launch gave %zu\n", need,
                     emu_block->dyn_bytes);
        std::abort();
    }
    return emu_block->dyn;
}
// Warps are 32 consecutive threads of a one-dimensional block.
inline void __syncwarp() { emu_block->sync_warp(threadIdx.x / 32); }

struct __nv_bfloat16 {
    unsigned short x;
};

// The bits of a bf16 (`__bfloat16_as_ushort`).
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

// `__shfl_xor_sync(0xffffffff, v, m)`: lane l gets the `v` of lane l ^ m (whole warps only).
inline float __shfl_xor_sync(unsigned, float v, int m) {
    const unsigned t = threadIdx.x;
    std::memcpy(&emu_block->xch[(size_t)t * EmuBlock::XCH], &v, 4);
    __syncwarp();
    const unsigned src = (t & ~31u) | ((t % 32) ^ (unsigned)m);
    float o;
    std::memcpy(&o, &emu_block->xch[(size_t)src * EmuBlock::XCH], 4);
    __syncwarp();
    return o;
}

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(u >> 16)};
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}

inline float emu_bf16_bits_to_float(uint32_t bits) {
    const uint32_t u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` with c as both C and D, a warp collective with
// the PTX ISA's fragment layout (groupID g = lane / 4, threadID_in_group q = lane % 4):
// a (16x16): register 0 holds (g, 2q..2q+1), 1 (g+8, 2q..), 2 (g, 2q+8..), 3 (g+8, 2q+8..), the lower
// column in the low half; b (16x8): register 0 holds rows 2q..2q+1 of column g, register 1 rows
// 2q+8..2q+9; c (16x8): (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1). Each lane publishes its fragments,
// then computes its own four outputs (fp32, k in order).
inline void emu_mma16816(float* c, const unsigned* a, const unsigned* b) {
    const unsigned t = threadIdx.x, lane = t % 32, w0 = t - lane;
    uint32_t* mine = &emu_block->xch[(size_t)t * EmuBlock::XCH];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b[0];
    mine[5] = b[1];
    __syncwarp();
    const unsigned g = lane / 4, q = lane % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
        float acc = c[i];
        for (unsigned k = 0; k < 16; ++k) {
            const unsigned la = (row % 8) * 4 + (k % 8) / 2, ra = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            const unsigned lb = col * 4 + (k % 8) / 2, rb = k >= 8 ? 1 : 0;
            const uint32_t wa = emu_block->xch[(size_t)(w0 + la) * EmuBlock::XCH + ra];
            const uint32_t wb = emu_block->xch[(size_t)(w0 + lb) * EmuBlock::XCH + 4 + rb];
            acc += emu_bf16_bits_to_float((wa >> (16 * (k & 1))) & 0xffffu) *
                   emu_bf16_bits_to_float((wb >> (16 * (k & 1))) & 0xffffu);
        }
        out[i] = acc;
    }
    __syncwarp();
    for (int i = 0; i < 4; ++i) c[i] = out[i];
}

// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`, a warp collective: lane 8j + i gives the address
// of row i of 8x8 matrix j (16 bytes, 16-byte aligned); register j of lane l receives elements
// (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix j, or with `trans` elements (2 (l % 4), l / 4)
// and (2 (l % 4) + 1, l / 4), the first in the low half.
inline void emu_ldmatrix_x4(unsigned* r, const void* row, bool trans) {
    const unsigned t = threadIdx.x, lane = t % 32, w0 = t - lane;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        std::fprintf(stderr, "ldmatrix: row address %p is not 16-byte aligned\n", row);
        std::abort();
    }
    const uint64_t addr = reinterpret_cast<uintptr_t>(row);
    std::memcpy(&emu_block->xch[(size_t)t * EmuBlock::XCH + 8], &addr, 8);
    __syncwarp();
    auto row_of = [&](unsigned matrix, unsigned i) {
        uint64_t a;
        std::memcpy(&a, &emu_block->xch[(size_t)(w0 + 8 * matrix + i) * EmuBlock::XCH + 8], 8);
        return reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(a));
    };
    const unsigned g = lane / 4, q = lane % 4;
    unsigned out[4];
    for (unsigned j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if (trans) {
            lo = row_of(j, 2 * q)[g];
            hi = row_of(j, 2 * q + 1)[g];
        } else {
            lo = row_of(j, g)[2 * q];
            hi = row_of(j, g)[2 * q + 1];
        }
        out[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
    __syncwarp();
    for (int j = 0; j < 4; ++j) r[j] = out[j];
}

// cp.async: the copies of a thread are held back until its `cp.async.wait_group` lets their group
// complete, so a kernel that reads a staged tile before waiting (and the barrier after it) reads stale
// data here too, as it may on a GPU. Groups are per thread, like the hardware's.
// `cp.async` of `bytes` (4 or 16), both addresses aligned to it.
inline void emu_cp_async(void* dst, const void* src, unsigned bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
        std::fprintf(stderr, "cp.async: %p <- %p is not %u-byte aligned\n", dst, src, bytes);
        std::abort();
    }
    emu_cur->cp_open.push_back(EmuCopy{dst, src, bytes});
}
inline void emu_cp_async_commit() {
    emu_cur->cp_groups.push_back(std::move(emu_cur->cp_open));
    emu_cur->cp_open.clear();
}
inline void emu_cp_async_wait(unsigned pending) {
    auto& groups = emu_cur->cp_groups;
    while (groups.size() > pending) {
        for (const EmuCopy& c : groups.front()) std::memcpy(c.dst, c.src, c.bytes);
        groups.erase(groups.begin());
    }
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }

// `nvcuda::wmma` (16x16x16 tiles): every thread of a warp holds the whole tile, element (r, c) at
// x[r * 16 + c], as float (bf16 values are exact in float). Loads are done by every thread; stores by
// lane 0 only, so a kernel must `__syncwarp()` before other lanes read what a store wrote (as CUDA
// requires too). Products accumulate in fp32 in k order.
// A GPU faults on a vector access (4 or 16 bytes at once) that is not aligned to its size; so does the
// emulator, loudly.
inline void emu_check_aligned(const void* p, unsigned bytes) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "misaligned %u-byte access at %p\n", bytes, p);
        std::abort();
    }
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 tiles only");
    static constexpr int num_elements = 256;
    float x[256];
};

// CUDA's requirements on every wmma load and store: a 256-bit aligned pointer and a leading dimension of
// a multiple of 16 bytes. A kernel that breaks them stops the emulator loudly.
template <class S>
inline void emu_wmma_check(const S* p, unsigned ldm) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(S)) % 16 != 0) {
        std::fprintf(stderr, "wmma: pointer %p must be 32-byte aligned and ldm %u a multiple of 16 bytes\n",
                     (const void*)p, ldm);
        std::abort();
    }
}

inline float emu_value(float v) { return v; }
inline float emu_value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, class T, class L, class S>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const S* p, unsigned ldm) {
    static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value, "layout");
    emu_wmma_check(p, ldm);
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = emu_value(std::is_same<L, row_major>::value ? p[(long long)r * ldm + c]
                                                                          : p[(long long)c * ldm + r]);
}

template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t l) {
    emu_wmma_check(p, ldm);
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = l == mem_row_major ? p[(long long)r * ldm + c] : p[(long long)c * ldm + r];
}

template <class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t l) {
    emu_wmma_check(p, ldm);
    if (threadIdx.x % 32 != 0) return;
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            (l == mem_row_major ? p[(long long)r * ldm + c] : p[(long long)c * ldm + r]) = f.x[r * 16 + c];
}

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
    for (float& e : f.x) e = v;
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    float t[256];
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n) {
            float acc = c.x[r * 16 + n];
            for (int k = 0; k < 16; ++k) acc += a.x[r * 16 + k] * b.x[k * 16 + n];
            t[r * 16 + n] = acc;
        }
    for (int e = 0; e < 256; ++e) d.x[e] = t[e];
}
}  // namespace wmma
}  // namespace nvcuda
