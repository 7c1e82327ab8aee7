// CPU emulation of the CUDA C++ subset `kernels.cu` uses, force-included by the emulator's build
// (`g++ -DFAST_LLM_EMU -include emu.h`).
//
// Model: a launch runs one block at a time; the block's threads are OS threads (one per
// threadIdx), each looping over all blocks in order with an end-of-block barrier (emu_harness.cpp).
// Hence:
// * `__shared__` is `static`: with one block live at a time a function-static array is that block's
//   shared memory (launches are serialized by a global mutex).
// * `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are thread_local globals set by the harness.
// * `__syncthreads()` is a barrier over the block's threads that are still running the kernel: a
//   thread that has returned leaves the block, and the others still meet.
// * `__nv_bfloat16` is 16 bits with round-to-nearest-even conversion from float (NaN kept, quieted),
//   like `__float2bfloat16` and the `half` crate.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct EmuDim3 {
    unsigned x, y, z;
};
inline thread_local EmuDim3 threadIdx{0, 0, 0};
inline thread_local EmuDim3 blockIdx{0, 0, 0};
inline thread_local EmuDim3 blockDim{1, 1, 1};
inline thread_local EmuDim3 gridDim{1, 1, 1};

// The barrier of the block being run (one per launch, reused block after block).
struct EmuBlock {
    std::mutex m;
    std::condition_variable cv;
    unsigned size;           // threads per block
    unsigned active;         // threads still inside the kernel for the current block
    unsigned arrived = 0;    // threads waiting at the current __syncthreads
    unsigned long long generation = 0;
    unsigned finished = 0;   // threads done with the current block
    unsigned long long block_generation = 0;

    explicit EmuBlock(unsigned n) : size(n), active(n) {}

    // __syncthreads: wait until every thread still in the kernel has arrived.
    void sync() {
        std::unique_lock<std::mutex> lock(m);
        const unsigned long long gen = generation;
        if (++arrived == active) {
            arrived = 0;
            ++generation;
            cv.notify_all();
        } else {
            cv.wait(lock, [&] { return generation != gen; });
        }
    }

    // The calling thread has returned from the kernel for this block: it leaves the barrier (releasing
    // the others if they were only waiting for it), then waits until every thread has finished the
    // block, so that the next block starts with the full set of threads.
    void finish() {
        std::unique_lock<std::mutex> lock(m);
        --active;
        if (arrived > 0 && arrived == active) {
            arrived = 0;
            ++generation;
        }
        if (++finished == size) {
            finished = 0;
            active = size;
            arrived = 0;
            ++block_generation;
            cv.notify_all();
        } else {
            cv.notify_all();
            const unsigned long long gen = block_generation;
            cv.wait(lock, [&] { return block_generation != gen; });
        }
    }
};

inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->sync(); }

struct __nv_bfloat16 {
    unsigned short x;
};

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

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
