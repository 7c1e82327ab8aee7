// Kernels of the CUDA backend: one source, compiled by NVRTC on a GPU machine and by g++ with `emu.h`
// (`-DFAST_LLM_EMU -include emu.h`) for the CPU emulator of the tests.
//
// Conventions (see `src/backend/mod.rs` for the semantics each kernel reproduces):
// * Every kernel is `extern "C" __global__`, with pointer, `int`, `long long` and `float` parameters only.
//   Each family is one `template <class T>` implementation instantiated for `float` (`_f32`) and
//   `__nv_bfloat16` (`_bf16`); loads and stores go through `ld` / `st`, and all arithmetic is fp32.
// * Shapes are written as `(rows, cols)`, row-major; `n` is the number of rows (tokens).
// * Static `__shared__` arrays (dynamic ones only where a kernel says so, through `DYNAMIC_SHARED`), no
//   atomics: every reduction goes through shared memory (or, in the mma attention, warp shuffles) in a
//   fixed order, so results are deterministic for a given launch geometry. The tensor-core attention
//   uses `nvcuda::wmma` tiles and `__syncwarp` (family `wmma`) or `mma.sync`, `ldmatrix`, `cp.async` and
//   `__shfl_xor_sync` (family `mma`); the emulator has all of them.
// * Kernels work for any power-of-two `blockDim.x` in 32..=256 (`MAX_BLOCK`), and every thread of a
//   block reaches every `__syncthreads()` (loops that contain a barrier have block-uniform bounds).
// * No printf, no standard library, no dynamic allocation.

#ifndef FAST_LLM_EMU
#include <cuda_bf16.h>
#include <mma.h>
#endif

typedef __nv_bfloat16 bf16;

// Largest supported blockDim.x (size of the shared reduction arrays).
#define MAX_BLOCK 256
// Largest supported attention head size (per-thread register/local arrays).
#define MAX_HEAD 128
// Keys (or queries) per shared-memory tile in the attention kernels: 2 tiles of
// ATTN_TILE x MAX_HEAD floats = 32 KiB of static shared memory.
#define ATTN_TILE 32

// The block's dynamic shared memory (16-byte aligned), of which the kernel uses `bytes`: the launcher
// passes at least that many (and raises the function's limit past 48 KiB); the emulator checks it.
#ifdef FAST_LLM_EMU
#define DYNAMIC_SHARED(name, bytes) unsigned char* name = emu_dynamic_shared(bytes)
#else
#define DYNAMIC_SHARED(name, bytes) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---------------------------------------------------------------------------------------------------
// Loads, stores, reductions.

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }

__device__ __forceinline__ long long global_thread() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long global_stride() {
    return (long long)gridDim.x * blockDim.x;
}

// The `v` of lane `lane ^ m` of the caller's warp (every lane of the warp must call it).
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

// The V at p as one vector access (p must be aligned to sizeof(V): a GPU faults otherwise, and so does
// the emulator), and its store.
template <class V>
__device__ __forceinline__ V ld_vec(const void* p) {
#ifdef FAST_LLM_EMU
    emu_check_aligned(p, sizeof(V));
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
#else
    return *reinterpret_cast<const V*>(p);
#endif
}
template <class V>
__device__ __forceinline__ void st_vec(void* p, V v) {
#ifdef FAST_LLM_EMU
    emu_check_aligned(p, sizeof(V));
    std::memcpy(p, &v, sizeof(V));
#else
    *reinterpret_cast<V*>(p) = v;
#endif
}

// 16 bytes (one vector access of `ld_vec` / `st_vec`).
struct __align__(16) V16 {
    unsigned w[4];
};
#ifndef FAST_LLM_EMU
// A 16-byte store written out: nvcc splits a store of the struct, or of a uint4, into four 4-byte
// stores when it cannot see the alignment (one that `vec_aligned` checked at run time). Loads stay whole.
template <>
__device__ __forceinline__ void st_vec<V16>(void* p, V16 v) {
    asm volatile("st.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3])
                 : "memory");
}
#endif

// Two consecutive bf16 (4-byte aligned) as one register, the first in the low half.
__device__ __forceinline__ unsigned ld_pair(const bf16* p) { return ld_vec<unsigned>(p); }
__device__ __forceinline__ unsigned pack_bits(bf16 lo, bf16 hi) {
    return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return pack_bits(__float2bfloat16(lo), __float2bfloat16(hi));
}
// Stores lo, hi as two consecutive bf16 (4-byte aligned).
__device__ __forceinline__ void st_pair(bf16* p, float lo, float hi) { st_vec<unsigned>(p, pack_bf16(lo, hi)); }

// W consecutive elements as floats (`ldw`) and their store (`stw`): W = 1 is one element; a larger W
// (a multiple of 16 bytes' worth: 8 bf16 or 4 float) is read and written as 16-byte vector accesses,
// so p must then be 16-byte aligned (`vec_aligned`).
template <class T>
struct Vec16 {
    static constexpr int N = 16 / (int)sizeof(T);
};
// A loop step's width as a type, so a generic lambda sees it as a constant (`decltype(w)::value`).
template <int W>
struct Width {
    static constexpr int value = W;
};
template <int W>
__device__ __forceinline__ void ldw(const float* p, float* v) {
    if constexpr (W == 1) {
        v[0] = *p;
    } else {
        static_assert(W % 4 == 0, "whole 16-byte vectors");
        for (int c = 0; c < W / 4; ++c) {
            const V16 u = ld_vec<V16>(p + 4 * c);
            for (int k = 0; k < 4; ++k) v[4 * c + k] = __int_as_float((int)u.w[k]);
        }
    }
}
template <int W>
__device__ __forceinline__ void ldw(const bf16* p, float* v) {
    if constexpr (W == 1) {
        v[0] = ld(*p);
    } else {
        static_assert(W % 8 == 0, "whole 16-byte vectors");
        for (int c = 0; c < W / 8; ++c) {
            const V16 u = ld_vec<V16>(p + 8 * c);
            for (int k = 0; k < 4; ++k) {
                v[8 * c + 2 * k] = __int_as_float((int)(u.w[k] << 16));
                v[8 * c + 2 * k + 1] = __int_as_float((int)(u.w[k] & 0xffff0000u));
            }
        }
    }
}
template <int W>
__device__ __forceinline__ void stw(float* p, const float* v) {
    if constexpr (W == 1) {
        *p = v[0];
    } else {
        static_assert(W % 4 == 0, "whole 16-byte vectors");
        for (int c = 0; c < W / 4; ++c) {
            V16 u;
            for (int k = 0; k < 4; ++k) u.w[k] = (unsigned)__float_as_int(v[4 * c + k]);
            st_vec<V16>(p + 4 * c, u);
        }
    }
}
template <int W>
__device__ __forceinline__ void stw(bf16* p, const float* v) {
    if constexpr (W == 1) {
        st(p, v[0]);
    } else {
        static_assert(W % 8 == 0, "whole 16-byte vectors");
        for (int c = 0; c < W / 8; ++c) {
            V16 u;
            for (int k = 0; k < 4; ++k) u.w[k] = pack_bf16(v[8 * c + 2 * k], v[8 * c + 2 * k + 1]);
            st_vec<V16>(p + 8 * c, u);
        }
    }
}
// Whether p is aligned for the vector accesses of `ldw` / `stw`.
template <class T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

struct SumOp {
    template <class V>
    __device__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// `op` over the block's `v` (tree order over thread indices), returned to every thread (the double sums:
// no double shuffles in the emulator). `red` is a shared array of at least blockDim.x elements.
template <class V, class Op>
__device__ V block_reduce(V v, V* red, Op op) {
    const int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] = op(red[t], red[t + s]);
        __syncthreads();
    }
    const V r = red[0];
    __syncthreads();
    return r;
}
// `op` over the block's `v`, returned to every thread: a butterfly of shuffles in each warp (every lane
// ends with the same value, as `op` commutes), then the warps' results in warp order, read by every
// thread; two barriers rather than one per halving. blockDim.x must be a multiple of 32 (one-dimensional
// blocks); `red` holds at least blockDim.x / 32 floats.
template <class Op>
__device__ float block_reduce_warps(float v, float* red, Op op) {
    for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < (int)blockDim.x / 32; ++w) r = op(r, red[w]);
    __syncthreads();
    return r;
}
__device__ float block_sum(float v, float* red) { return block_reduce_warps(v, red, SumOp()); }
__device__ float block_max(float v, float* red) { return block_reduce_warps(v, red, MaxOp()); }
__device__ double block_sum_double(double v, double* red) { return block_reduce(v, red, SumOp()); }

// Vector loops: a thread takes N = Vec16<T>::N consecutive elements per step (16 bytes of T) where the
// pointers allow it, one element otherwise; `f(index, Width<W>())` does the same arithmetic per element
// at either width.

// f over 0..n, grid-stride: steps of N elements when `vec` (every pointer the caller uses 16-byte
// aligned), then the last n % N elements one at a time; every element alone otherwise.
template <class T, class F>
__device__ void for_vec(long long n, bool vec, F f) {
    constexpr int N = Vec16<T>::N;
    long long done = 0;
    if (vec) {
        for (long long p = global_thread(); p < n / N; p += global_stride()) f(p * N, Width<N>());
        done = n / N * N;
    }
    for (long long i = done + global_thread(); i < n; i += global_stride()) f(i, Width<1>());
}
// f over the columns 0..cols of one row, by the block's threads: steps of N columns when `vec` (which
// needs cols a multiple of N and 16-byte aligned rows), else one column at a time.
template <class T, class F>
__device__ void row_vec(int cols, bool vec, F f) {
    constexpr int N = Vec16<T>::N;
    if (vec) {
        for (int j = N * threadIdx.x; j < cols; j += N * blockDim.x) f(j, Width<N>());
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) f(j, Width<1>());
    }
}

// ---------------------------------------------------------------------------------------------------
// Casts and elementwise sums (grid-stride loops).

// out (n) = bf16(in), round to nearest even.
extern "C" __global__ void cast_f32_to_bf16(bf16* out, const float* in, long long n) {
    for_vec<bf16>(n, vec_aligned(out) && vec_aligned(in), [&](long long i, auto w) {
        constexpr int W = decltype(w)::value;
        float v[W];
        ldw<W>(in + i, v);
        stw<W>(out + i, v);
    });
}

// out (n) = float(in), exact.
extern "C" __global__ void cast_bf16_to_f32(float* out, const bf16* in, long long n) {
    for_vec<bf16>(n, vec_aligned(out) && vec_aligned(in), [&](long long i, auto w) {
        constexpr int W = decltype(w)::value;
        float v[W];
        ldw<W>(in + i, v);
        stw<W>(out + i, v);
    });
}

// out (n) += x (n).
template <class T>
__device__ void add_impl(T* out, const T* x, long long n) {
    for_vec<T>(n, vec_aligned(out) && vec_aligned(x), [&](long long i, auto w) {
        constexpr int W = decltype(w)::value;
        float o[W], v[W];
        ldw<W>(out + i, o);
        ldw<W>(x + i, v);
        for (int k = 0; k < W; ++k) o[k] += v[k];
        stw<W>(out + i, o);
    });
}
extern "C" __global__ void add_f32(float* out, const float* x, long long n) { add_impl(out, x, n); }
extern "C" __global__ void add_bf16(bf16* out, const bf16* x, long long n) { add_impl(out, x, n); }

// ---------------------------------------------------------------------------------------------------
// Embedding.

// out (n, hidden) = table[tokens] with table (vocab, hidden). Tokens must be < vocab: the kernel does
// not know vocab (StagedKernels checks on the host before uploading).
template <class T>
__device__ void embedding_fwd_impl(T* out, const unsigned* tokens, const T* table, int n, int hidden) {
    const long long total = (long long)n * hidden;
    for (long long e = global_thread(); e < total; e += global_stride()) {
        const long long i = e / hidden, j = e % hidden;
        out[e] = table[(long long)tokens[i] * hidden + j];
    }
}
extern "C" __global__ void embedding_fwd_f32(float* out, const unsigned* tokens, const float* table, int n,
                                             int hidden) {
    embedding_fwd_impl(out, tokens, table, n, hidden);
}
extern "C" __global__ void embedding_fwd_bf16(bf16* out, const unsigned* tokens, const bf16* table, int n,
                                              int hidden) {
    embedding_fwd_impl(out, tokens, table, n, hidden);
}

// grad_table (vocab, hidden) fp32 += grad_out rows, grouped by token, deterministically, in two passes
// so that a frequent token is not summed by one block alone. `order` (n) lists the token positions
// sorted stably by token id, cut into segments of consecutive positions of one token:
// `order[seg_start[s] .. seg_start[s+1]]` (num_segs + 1 entries); run r (one token) is segments
// `run_seg[r] .. run_seg[r+1]` (num_runs + 1 entries).
// Pass 1, grid (segments, column blocks): partial[s][col] = the segment's rows summed in position order.
// Pass 2, grid (runs, column blocks): grad_table[token][col] += the run's partials summed in order.
// (The CPU backend adds each row into the table in turn: the rounding differs, within tolerance; from a
// zero table and a run of one segment the two agree exactly.)
template <class T>
__device__ void embedding_bwd_partial_impl(float* partial, const int* order, const int* seg_start, int num_segs,
                                           const T* grad_out, int hidden) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= hidden) return;
    for (int sg = blockIdx.x; sg < num_segs; sg += gridDim.x) {
        float acc = 0.0f;
        for (int p = seg_start[sg]; p < seg_start[sg + 1]; ++p) acc += ld(grad_out[(long long)order[p] * hidden + j]);
        partial[(long long)sg * hidden + j] = acc;
    }
}
extern "C" __global__ void embedding_bwd_partial_f32(float* partial, const int* order, const int* seg_start,
                                                     int num_segs, const float* grad_out, int hidden) {
    embedding_bwd_partial_impl(partial, order, seg_start, num_segs, grad_out, hidden);
}
extern "C" __global__ void embedding_bwd_partial_bf16(float* partial, const int* order, const int* seg_start,
                                                      int num_segs, const bf16* grad_out, int hidden) {
    embedding_bwd_partial_impl(partial, order, seg_start, num_segs, grad_out, hidden);
}
extern "C" __global__ void embedding_bwd_sum(float* grad_table, const float* partial, const int* run_seg,
                                             int num_runs, const int* order, const int* seg_start,
                                             const unsigned* tokens, int hidden) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= hidden) return;
    for (int r = blockIdx.x; r < num_runs; r += gridDim.x) {
        const int s0 = run_seg[r], s1 = run_seg[r + 1];
        const long long token = tokens[order[seg_start[s0]]];
        float acc = 0.0f;
        for (int sg = s0; sg < s1; ++sg) acc += partial[(long long)sg * hidden + j];
        grad_table[token * hidden + j] += acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm.

// out (n, hidden) = x * rstd * weight, rstd (n) = 1 / sqrt(mean(x^2) + eps). One block per row.
template <class T>
__device__ void rms_norm_fwd_impl(T* out, float* rstd, const T* x, const T* weight, int n, int hidden,
                                  float eps) {
    __shared__ float red[MAX_BLOCK / 32];
    const float inv_c = 1.0f / (float)hidden;
    const bool vec =
        hidden % Vec16<T>::N == 0 && vec_aligned(out) && vec_aligned(x) && vec_aligned(weight);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + (long long)row * hidden;
        T* orow = out + (long long)row * hidden;
        float ss = 0.0f;
        row_vec<T>(hidden, vec, [&](int j, auto w) {
            constexpr int W = decltype(w)::value;
            float v[W];
            ldw<W>(xr + j, v);
            for (int k = 0; k < W; ++k) ss += v[k] * v[k];
        });
        ss = block_sum(ss, red);
        const float rs = 1.0f / sqrtf(ss * inv_c + eps);
        if (threadIdx.x == 0) rstd[row] = rs;
        row_vec<T>(hidden, vec, [&](int j, auto w) {
            constexpr int W = decltype(w)::value;
            float v[W], wt[W];
            ldw<W>(xr + j, v);
            ldw<W>(weight + j, wt);
            for (int k = 0; k < W; ++k) v[k] = v[k] * rs * wt[k];
            stw<W>(orow + j, v);
        });
    }
}
extern "C" __global__ void rms_norm_fwd_f32(float* out, float* rstd, const float* x, const float* weight, int n,
                                            int hidden, float eps) {
    rms_norm_fwd_impl(out, rstd, x, weight, n, hidden, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(bf16* out, float* rstd, const bf16* x, const bf16* weight, int n,
                                             int hidden, float eps) {
    rms_norm_fwd_impl(out, rstd, x, weight, n, hidden, eps);
}

// The two halves of a row of the RMSNorm backward at columns j .. j + W of the row at `base`: the row's
// dot term sum(w * g * x), and grad_x = r * w * g - x * coef (coef = r^3 / hidden * the row's dot), added
// to the old grad_x with `accumulate` (one rounding of the sum: the residual stream's gradient and the
// norm's). With `dw`, also dw[k] += g * x * r (the weight gradient's terms, in that order).
template <int W, class T>
__device__ __forceinline__ float rms_bwd_dot(const T* weight, const T* grad_out, const T* x, long long base, int j) {
    float wt[W], g[W], v[W];
    ldw<W>(weight + j, wt);
    ldw<W>(grad_out + base + j, g);
    ldw<W>(x + base + j, v);
    float d = 0.0f;
    for (int k = 0; k < W; ++k) d += wt[k] * g[k] * v[k];
    return d;
}
template <int W, class T>
__device__ __forceinline__ void rms_bwd_dx(T* grad_x, const T* grad_out, const T* x, const T* weight, long long base,
                                           int j, float r, float coef, int accumulate, float* dw) {
    float wt[W], g[W], v[W];
    ldw<W>(weight + j, wt);
    ldw<W>(grad_out + base + j, g);
    ldw<W>(x + base + j, v);
    for (int k = 0; k < W; ++k) {
        if (dw) dw[k] += g[k] * v[k] * r;
        g[k] = r * (wt[k] * g[k]) - v[k] * coef;
    }
    T* gx = grad_x + base + j;
    if (accumulate) {
        float old[W];
        ldw<W>(gx, old);
        for (int k = 0; k < W; ++k) g[k] = old[k] + g[k];
    }
    stw<W>(gx, g);
}

// grad_x (n, hidden) as rms_bwd_dx, one block per row.
template <class T>
__device__ void rms_norm_bwd_dx_impl(T* grad_x, const T* grad_out, const T* x, const T* weight,
                                     const float* rstd, int n, int hidden, int accumulate) {
    __shared__ float red[MAX_BLOCK / 32];
    const float inv_c = 1.0f / (float)hidden;
    const bool vec = hidden % Vec16<T>::N == 0 && vec_aligned(grad_x) && vec_aligned(grad_out) && vec_aligned(x) &&
                     vec_aligned(weight);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const long long base = (long long)row * hidden;
        const float r = rstd[row];
        float d = 0.0f;
        row_vec<T>(hidden, vec, [&](int j, auto w) {
            d += rms_bwd_dot<decltype(w)::value>(weight, grad_out, x, base, j);
        });
        d = block_sum(d, red);
        const float coef = d * r * r * r * inv_c;
        row_vec<T>(hidden, vec, [&](int j, auto w) {
            rms_bwd_dx<decltype(w)::value>(grad_x, grad_out, x, weight, base, j, r, coef, accumulate, nullptr);
        });
    }
}
extern "C" __global__ void rms_norm_bwd_dx_f32(float* grad_x, const float* grad_out, const float* x,
                                               const float* weight, const float* rstd, int n, int hidden,
                                               int accumulate) {
    rms_norm_bwd_dx_impl(grad_x, grad_out, x, weight, rstd, n, hidden, accumulate);
}
extern "C" __global__ void rms_norm_bwd_dx_bf16(bf16* grad_x, const bf16* grad_out, const bf16* x,
                                                const bf16* weight, const float* rstd, int n, int hidden,
                                                int accumulate) {
    rms_norm_bwd_dx_impl(grad_x, grad_out, x, weight, rstd, n, hidden, accumulate);
}

// RMSNorm backward in one pass over the rows (the input gradient and the weight gradient's partial sums
// together, so grad_out and x are read from memory once): block b takes rows_per_block consecutive rows,
// computes each one's grad_x as rms_norm_bwd_dx (+= with `accumulate`), and writes partial[b][j], the
// sum over its rows in order of grad_out * x * rstd (the chunk sums of rms_norm_bwd_dw, rows_per_block
// rows to a chunk). A thread owns the same columns in every row (at most RMS_DW_GROUPS steps of W
// elements: the launcher checks hidden <= RMS_DW_GROUPS * W * blockDim.x, with W = Vec16<T>::N when the
// rows allow vectors and 1 otherwise) and keeps their sums in registers.
#define RMS_DW_GROUPS 2
template <int W, class T>
__device__ void rms_norm_bwd_rows(T* grad_x, float* partial, const T* grad_out, const T* x, const T* weight,
                                  const float* rstd, int n, int hidden, int rows_per_block, int accumulate,
                                  float* red) {
    const float inv_c = 1.0f / (float)hidden;
    float dw[RMS_DW_GROUPS][W];
#pragma unroll
    for (int q = 0; q < RMS_DW_GROUPS; ++q)
#pragma unroll
        for (int k = 0; k < W; ++k) dw[q][k] = 0.0f;
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = r0 + rows_per_block < n ? r0 + rows_per_block : n;
    for (int row = r0; row < r1; ++row) {
        const long long base = (long long)row * hidden;
        const float r = rstd[row];
        float d = 0.0f;
#pragma unroll
        for (int q = 0; q < RMS_DW_GROUPS; ++q) {
            const int j = (q * (int)blockDim.x + (int)threadIdx.x) * W;
            if (j < hidden) d += rms_bwd_dot<W>(weight, grad_out, x, base, j);
        }
        d = block_sum(d, red);
        const float coef = d * r * r * r * inv_c;
#pragma unroll
        for (int q = 0; q < RMS_DW_GROUPS; ++q) {
            const int j = (q * (int)blockDim.x + (int)threadIdx.x) * W;
            if (j < hidden) rms_bwd_dx<W>(grad_x, grad_out, x, weight, base, j, r, coef, accumulate, dw[q]);
        }
    }
#pragma unroll
    for (int q = 0; q < RMS_DW_GROUPS; ++q) {
        const int j = (q * (int)blockDim.x + (int)threadIdx.x) * W;
        if (j < hidden) stw<W>(partial + (long long)blockIdx.x * hidden + j, dw[q]);
    }
}
template <class T>
__device__ void rms_norm_bwd_impl(T* grad_x, float* partial, const T* grad_out, const T* x, const T* weight,
                                  const float* rstd, int n, int hidden, int rows_per_block, int accumulate) {
    __shared__ float red[MAX_BLOCK / 32];
    const bool vec = hidden % Vec16<T>::N == 0 && vec_aligned(grad_x) && vec_aligned(grad_out) && vec_aligned(x) &&
                     vec_aligned(weight);
    if (vec) {
        rms_norm_bwd_rows<Vec16<T>::N>(grad_x, partial, grad_out, x, weight, rstd, n, hidden, rows_per_block,
                                       accumulate, red);
    } else {
        rms_norm_bwd_rows<1>(grad_x, partial, grad_out, x, weight, rstd, n, hidden, rows_per_block, accumulate, red);
    }
}
extern "C" __global__ void rms_norm_bwd_f32(float* grad_x, float* partial, const float* grad_out, const float* x,
                                            const float* weight, const float* rstd, int n, int hidden,
                                            int rows_per_block, int accumulate) {
    rms_norm_bwd_impl(grad_x, partial, grad_out, x, weight, rstd, n, hidden, rows_per_block, accumulate);
}
extern "C" __global__ void rms_norm_bwd_bf16(bf16* grad_x, float* partial, const bf16* grad_out, const bf16* x,
                                             const bf16* weight, const float* rstd, int n, int hidden,
                                             int rows_per_block, int accumulate) {
    rms_norm_bwd_impl(grad_x, partial, grad_out, x, weight, rstd, n, hidden, rows_per_block, accumulate);
}

// Without room in registers for a row's columns (hidden above RMS_DW_GROUPS steps): the two kernels below.
// grad_weight (hidden) fp32 += sum over rows of g * x * rstd, in two deterministic passes so the whole
// GPU works on it: pass 1 (grid: column blocks x row chunks) writes partial[chunk][col], the sum of the
// chunk's rows in order; pass 2 (one thread per column) adds the chunks in order into grad_weight.
template <class T>
__device__ void rms_norm_bwd_dw_impl(float* partial, const T* grad_out, const T* x, const float* rstd, int n,
                                     int hidden, int rows_per_chunk) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (j >= hidden) return;
    const int i0 = chunk * rows_per_chunk;
    int i1 = i0 + rows_per_chunk;
    if (i1 > n) i1 = n;
    float acc = 0.0f;
    for (int i = i0; i < i1; ++i) {
        const long long e = (long long)i * hidden + j;
        acc += ld(grad_out[e]) * ld(x[e]) * rstd[i];
    }
    partial[(long long)chunk * hidden + j] = acc;
}
extern "C" __global__ void rms_norm_bwd_dw_f32(float* partial, const float* grad_out, const float* x,
                                               const float* rstd, int n, int hidden, int rows_per_chunk) {
    rms_norm_bwd_dw_impl(partial, grad_out, x, rstd, n, hidden, rows_per_chunk);
}
extern "C" __global__ void rms_norm_bwd_dw_bf16(float* partial, const bf16* grad_out, const bf16* x,
                                                const float* rstd, int n, int hidden, int rows_per_chunk) {
    rms_norm_bwd_dw_impl(partial, grad_out, x, rstd, n, hidden, rows_per_chunk);
}
// out[j] += the sum over chunks c of partial[c][j]. Blocks of (32, SUM_LANES) threads: block b takes
// columns 32b .. 32b + 31; lane y of a column adds chunks y, y + SUM_LANES, ... in order, then lane 0
// adds the lanes' sums in lane order (a fixed order, so deterministic; several loads in flight per
// column rather than a chain of `chunks`).
#define SUM_LANES 8
extern "C" __global__ void sum_chunks_f32(float* out, const float* partial, int chunks, int cols) {
    __shared__ float lanes[SUM_LANES][33];
    const int j = blockIdx.x * 32 + threadIdx.x, y = threadIdx.y;
    float acc = 0.0f;
    if (j < cols)
        for (int c = y; c < chunks; c += SUM_LANES) acc += partial[(long long)c * cols + j];
    lanes[y][threadIdx.x] = acc;
    __syncthreads();
    if (y == 0 && j < cols) {
        float s = 0.0f;
        for (int l = 0; l < SUM_LANES; ++l) s += lanes[l][threadIdx.x];
        out[j] += s;
    }
}

// ---------------------------------------------------------------------------------------------------
// Per-head RMSNorm (query/key norms, Qwen3), in place on the first num_heads * head_size values of each
// of the n rows of x (row_stride apart): head h of a row becomes hat * w, hat = head * rstd, w the row
// (h < split ? 0 : 1) of weight (2, head_size). One warp-sized block per (row, head), grid-stride.
// Head it % num_heads of row it / num_heads of x, and its weight row.
template <class T>
__device__ __forceinline__ T* head_norm_row(T* x, long long it, int row_stride, int num_heads, int head_size) {
    const long long row = it / num_heads;
    return x + row * row_stride + (it - row * num_heads) * head_size;
}
template <class T>
__device__ __forceinline__ const T* head_norm_weight(const T* weight, long long it, int num_heads, int split,
                                                     int head_size) {
    return weight + (it % num_heads < split ? 0 : head_size);
}
template <class T>
__device__ void head_norm_fwd_impl(T* x, T* hat, float* rstd, const T* weight, int n, int row_stride,
                                   int num_heads, int split, int head_size, float eps) {
    __shared__ float red[MAX_BLOCK / 32];
    const float inv_d = 1.0f / (float)head_size;
    const long long items = (long long)n * num_heads;
    for (long long it = blockIdx.x; it < items; it += gridDim.x) {
        T* xh = head_norm_row(x, it, row_stride, num_heads, head_size);
        T* hh = hat + it * head_size;
        const T* w = head_norm_weight(weight, it, num_heads, split, head_size);
        float ss = 0.0f;
        for (int j = threadIdx.x; j < head_size; j += blockDim.x) {
            const float v = ld(xh[j]);
            ss += v * v;
        }
        ss = block_sum(ss, red);
        const float rs = 1.0f / sqrtf(ss * inv_d + eps);
        if (threadIdx.x == 0) rstd[it] = rs;
        for (int j = threadIdx.x; j < head_size; j += blockDim.x) {
            // hat is stored in T; the output is computed from the stored (rounded) hat, as the
            // backward sees it.
            st(hh + j, ld(xh[j]) * rs);
            st(xh + j, ld(hh[j]) * ld(w[j]));
        }
    }
}
extern "C" __global__ void head_norm_fwd_f32(float* x, float* hat, float* rstd, const float* weight, int n,
                                             int row_stride, int num_heads, int split, int head_size, float eps) {
    head_norm_fwd_impl(x, hat, rstd, weight, n, row_stride, num_heads, split, head_size, eps);
}
extern "C" __global__ void head_norm_fwd_bf16(bf16* x, bf16* hat, float* rstd, const bf16* weight, int n,
                                              int row_stride, int num_heads, int split, int head_size, float eps) {
    head_norm_fwd_impl(x, hat, rstd, weight, n, row_stride, num_heads, split, head_size, eps);
}
// The input gradient in place: g = r * (w*g - hat * mean(w*g*hat)), one block per (row, head).
template <class T>
__device__ void head_norm_bwd_dx_impl(T* grad, const T* hat, const T* weight, const float* rstd, int n,
                                      int row_stride, int num_heads, int split, int head_size) {
    __shared__ float red[MAX_BLOCK / 32];
    const float inv_d = 1.0f / (float)head_size;
    const long long items = (long long)n * num_heads;
    for (long long it = blockIdx.x; it < items; it += gridDim.x) {
        T* gh = head_norm_row(grad, it, row_stride, num_heads, head_size);
        const T* hh = hat + it * head_size;
        const T* w = head_norm_weight(weight, it, num_heads, split, head_size);
        float m = 0.0f;
        for (int j = threadIdx.x; j < head_size; j += blockDim.x) m += ld(w[j]) * ld(gh[j]) * ld(hh[j]);
        m = block_sum(m, red) * inv_d;
        const float r = rstd[it];
        for (int j = threadIdx.x; j < head_size; j += blockDim.x) st(gh + j, r * (ld(w[j]) * ld(gh[j]) - ld(hh[j]) * m));
    }
}
extern "C" __global__ void head_norm_bwd_dx_f32(float* grad, const float* hat, const float* weight,
                                                const float* rstd, int n, int row_stride, int num_heads, int split,
                                                int head_size) {
    head_norm_bwd_dx_impl(grad, hat, weight, rstd, n, row_stride, num_heads, split, head_size);
}
extern "C" __global__ void head_norm_bwd_dx_bf16(bf16* grad, const bf16* hat, const bf16* weight,
                                                 const float* rstd, int n, int row_stride, int num_heads, int split,
                                                 int head_size) {
    head_norm_bwd_dx_impl(grad, hat, weight, rstd, n, row_stride, num_heads, split, head_size);
}
// Weight-gradient chunk sums (before the input gradient replaces the output's): partial[chunk][c] for
// column c of weight row g = c / head_size: the sum of grad * hat over the chunk's rows in order, and in
// a row over g's heads in order. A thread per column (grid: column blocks x chunks); sum_chunks_f32
// then adds the chunks in order.
template <class T>
__device__ void head_norm_bwd_dw_impl(float* partial, const T* grad, const T* hat, int n, int row_stride,
                                      int num_heads, int split, int head_size, int rows_per_chunk) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (col >= 2 * head_size) return;
    const int j = col % head_size;
    const int h0 = col < head_size ? 0 : split, h1 = col < head_size ? split : num_heads;
    const int i0 = chunk * rows_per_chunk;
    const int i1 = i0 + rows_per_chunk < n ? i0 + rows_per_chunk : n;
    float acc = 0.0f;
    for (int i = i0; i < i1; ++i)
        for (int h = h0; h < h1; ++h)
            acc += ld(grad[(long long)i * row_stride + (long long)h * head_size + j]) *
                   ld(hat[((long long)i * num_heads + h) * head_size + j]);
    partial[(long long)chunk * 2 * head_size + col] = acc;
}
extern "C" __global__ void head_norm_bwd_dw_f32(float* partial, const float* grad, const float* hat, int n,
                                                int row_stride, int num_heads, int split, int head_size,
                                                int rows_per_chunk) {
    head_norm_bwd_dw_impl(partial, grad, hat, n, row_stride, num_heads, split, head_size, rows_per_chunk);
}
extern "C" __global__ void head_norm_bwd_dw_bf16(float* partial, const bf16* grad, const bf16* hat, int n,
                                                 int row_stride, int num_heads, int split, int head_size,
                                                 int rows_per_chunk) {
    head_norm_bwd_dw_impl(partial, grad, hat, n, row_stride, num_heads, split, head_size, rows_per_chunk);
}

// ---------------------------------------------------------------------------------------------------
// Rotary embedding (rotate-half), in place on the first num_heads * head_size values of each of the n
// rows of x (row_stride values apart). Row i is at position i % seq; cos, sin are (seq, head_size/2)
// fp32. With `inverse` the rotation is by -angle. Rows are spread over blocks, (head, pair) over the
// block's threads (no 64-bit division per element).
template <class T>
__device__ void rotary_impl(T* x, int row_stride, int num_heads, int head_size, int seq, const float* cos_t,
                            const float* sin_t, int n, int inverse) {
    const int half = head_size / 2;
    const int pairs = num_heads * half;
    // (u, v) rotated by the angle of (c, s), or by its opposite with `inverse`.
    auto rot = [&](float u, float v, float c, float s, float& ra, float& rb) {
        if (inverse) {
            ra = u * c + v * s;
            rb = v * c - u * s;
        } else {
            ra = u * c - v * s;
            rb = v * c + u * s;
        }
    };
    // N = Vec16<T>::N adjacent pairs (d .. d + N) of one head at a time: needs half a multiple of N and
    // 16-byte aligned rows and tables.
    const bool vec = half % Vec16<T>::N == 0 && row_stride % Vec16<T>::N == 0 && vec_aligned(x) &&
                     vec_aligned(cos_t) && vec_aligned(sin_t);
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const int pos = i % seq;
        T* row = x + (long long)i * row_stride;
        const float* cr = cos_t + (long long)pos * half;
        const float* sr = sin_t + (long long)pos * half;
        row_vec<T>(pairs, vec, [&](int k, auto w) {
            constexpr int W = decltype(w)::value;
            const int head = k / half, d = k - head * half;
            T* a = row + head * head_size + d;
            T* b = a + half;
            float u[W], v[W], c[W], sn[W];
            ldw<W>(a, u);
            ldw<W>(b, v);
            ldw<W>(cr + d, c);
            ldw<W>(sr + d, sn);
            for (int e = 0; e < W; ++e) {
                float ra, rb;
                rot(u[e], v[e], c[e], sn[e], ra, rb);
                u[e] = ra;
                v[e] = rb;
            }
            stw<W>(a, u);
            stw<W>(b, v);
        });
    }
}
extern "C" __global__ void rotary_f32(float* x, int row_stride, int num_heads, int head_size, int seq,
                                      const float* cos_t, const float* sin_t, int n, int inverse) {
    rotary_impl(x, row_stride, num_heads, head_size, seq, cos_t, sin_t, n, inverse);
}
extern "C" __global__ void rotary_bf16(bf16* x, int row_stride, int num_heads, int head_size, int seq,
                                       const float* cos_t, const float* sin_t, int n, int inverse) {
    rotary_impl(x, row_stride, num_heads, head_size, seq, cos_t, sin_t, n, inverse);
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU: gate_up (n, 2*inter) rows are [gate | up]; out (n, inter) = silu(gate) * up.

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

__device__ __forceinline__ float swiglu(float g, float u) { return g * sigmoidf(g) * u; }

// Rows over blocks, columns over the block's threads.
template <class T>
__device__ void swiglu_fwd_impl(T* out, const T* gate_up, long long n, int inter) {
    const bool vec = inter % Vec16<T>::N == 0 && vec_aligned(out) && vec_aligned(gate_up);
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const T* gr = gate_up + i * 2 * inter;
        T* orow = out + i * inter;
        row_vec<T>(inter, vec, [&](int j, auto w) {
            constexpr int W = decltype(w)::value;
            float g[W], u[W];
            ldw<W>(gr + j, g);
            ldw<W>(gr + inter + j, u);
            for (int k = 0; k < W; ++k) g[k] = swiglu(g[k], u[k]);
            stw<W>(orow + j, g);
        });
    }
}
extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate_up, long long n, int inter) {
    swiglu_fwd_impl(out, gate_up, n, inter);
}
extern "C" __global__ void swiglu_fwd_bf16(bf16* out, const bf16* gate_up, long long n, int inter) {
    swiglu_fwd_impl(out, gate_up, n, inter);
}

// grad_gate_up (n, 2*inter) from grad_out (n, inter): d up = g_o * silu(gate),
// d gate = g_o * up * sig * (1 + gate * (1 - sig)).
template <class T>
__device__ void swiglu_bwd_impl(T* grad_gate_up, const T* grad_out, const T* gate_up, long long n, int inter) {
    // (d gate, d up) of one column.
    auto grads = [](float g, float u, float d, float& dg, float& du) {
        const float sg = sigmoidf(g);
        du = d * (g * sg);
        dg = d * u * (sg * (1.0f + g * (1.0f - sg)));
    };
    const bool vec =
        inter % Vec16<T>::N == 0 && vec_aligned(grad_gate_up) && vec_aligned(grad_out) && vec_aligned(gate_up);
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const T* gr = gate_up + i * 2 * inter;
        const T* dr = grad_out + i * inter;
        T* gg = grad_gate_up + i * 2 * inter;
        row_vec<T>(inter, vec, [&](int j, auto w) {
            constexpr int W = decltype(w)::value;
            float g[W], u[W], d[W];
            ldw<W>(gr + j, g);
            ldw<W>(gr + inter + j, u);
            ldw<W>(dr + j, d);
            for (int k = 0; k < W; ++k) {
                float dg, du;
                grads(g[k], u[k], d[k], dg, du);
                g[k] = dg;
                u[k] = du;
            }
            stw<W>(gg + inter + j, u);
            stw<W>(gg + j, g);
        });
    }
}
extern "C" __global__ void swiglu_bwd_f32(float* grad_gate_up, const float* grad_out, const float* gate_up,
                                          long long n, int inter) {
    swiglu_bwd_impl(grad_gate_up, grad_out, gate_up, n, inter);
}
extern "C" __global__ void swiglu_bwd_bf16(bf16* grad_gate_up, const bf16* grad_out, const bf16* gate_up,
                                           long long n, int inter) {
    swiglu_bwd_impl(grad_gate_up, grad_out, gate_up, n, inter);
}

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy: logits (n, vocab), targets (n), row_loss (n) = logsumexp(row) - row[target].
// With write_grad, the row is overwritten with grad_scale * (softmax - onehot). One block per row.
// The launcher checks targets < vocab (an out-of-range target gives a NaN loss and no onehot).
template <class T>
__device__ void cross_entropy_impl(T* logits, float* row_loss, const unsigned* targets, int n, int vocab,
                                   float grad_scale, int write_grad) {
    __shared__ float red[MAX_BLOCK / 32];
    const bool vec = vocab % Vec16<T>::N == 0 && vec_aligned(logits);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        T* x = logits + (long long)row * vocab;
        const unsigned t = targets[row];
        // Every thread reads the target logit before the barriers of the reductions, hence before
        // any thread overwrites the row.
        const float zt = t < (unsigned)vocab ? ld(x[t]) : __int_as_float(0x7fc00000);
        // One pass over the row: this thread's running max and its sum of exp(x - max).
        float mx = neg_inf(), se = 0.0f;
        auto see = [&](float v) {
            if (v > mx) {
                se = se * expf(mx - v) + 1.0f;
                mx = v;
            } else {
                se += expf(v - mx);
            }
        };
        row_vec<T>(vocab, vec, [&](int j, auto w) {
            constexpr int W = decltype(w)::value;
            float v[W];
            ldw<W>(x + j, v);
            for (int k = 0; k < W; ++k) see(v[k]);
        });
        const float row_max = block_max(mx, red);
        // A thread that saw nothing (or only -inf) adds nothing.
        se = block_sum(mx == neg_inf() ? 0.0f : se * expf(mx - row_max), red);
        if (threadIdx.x == 0) row_loss[row] = (row_max + logf(se)) - zt;
        if (write_grad) {
            const float f = grad_scale / se;
            auto grad = [&](int j, float v) { return expf(v - row_max) * f - ((unsigned)j == t ? grad_scale : 0.0f); };
            row_vec<T>(vocab, vec, [&](int j, auto w) {
                constexpr int W = decltype(w)::value;
                float v[W];
                ldw<W>(x + j, v);
                for (int k = 0; k < W; ++k) v[k] = grad(j + k, v[k]);
                stw<W>(x + j, v);
            });
        }
    }
}
extern "C" __global__ void cross_entropy_f32(float* logits, float* row_loss, const unsigned* targets, int n,
                                             int vocab, float grad_scale, int write_grad) {
    cross_entropy_impl(logits, row_loss, targets, n, vocab, grad_scale, write_grad);
}
extern "C" __global__ void cross_entropy_bf16(bf16* logits, float* row_loss, const unsigned* targets, int n,
                                              int vocab, float grad_scale, int write_grad) {
    cross_entropy_impl(logits, row_loss, targets, n, vocab, grad_scale, write_grad);
}

// ---------------------------------------------------------------------------------------------------
// Causal self-attention with grouped KV heads, flash-style: the (seq, seq) scores are never stored;
// the forward saves the log-sum-exp of each query row, the backward recomputes the probabilities.
//
// qkv (batch*seq, (heads + 2*kv_heads) * head_size), rows [q heads | k heads | v heads]; query head h
// uses kv head h / (heads / kv_heads). out (batch*seq, heads*head_size), lse and delta
// (batch, heads, seq) fp32. head_size <= MAX_HEAD (checked by the launcher).

// Stages rows r0 .. r0+ATTN_TILE of two head slices (columns c_a and c_b of rows of `stride` values,
// batch rows starting at `base`) into the shared tiles, as fp32; rows past `seq` are zeroed.
// Must be called by every thread of the block.
template <class T>
__device__ void attn_stage(float* tile_a, float* tile_b, const T* src_a, const T* src_b, long long stride,
                           int r0, int seq, int head_size) {
    const int count = ATTN_TILE * head_size;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
        const int r = e / head_size, d = e % head_size;
        const int row = r0 + r;
        float a = 0.0f, b = 0.0f;
        if (row < seq) {
            a = ld(src_a[row * stride + d]);
            b = ld(src_b[row * stride + d]);
        }
        tile_a[r * MAX_HEAD + d] = a;
        tile_b[r * MAX_HEAD + d] = b;
    }
}

// First key query row `i` attends under a sliding window of `window` keys (itself included; `window`
// >= seq is full causal attention).
__device__ __forceinline__ int attn_first_key(int i, int window) { return i - window + 1 > 0 ? i - window + 1 : 0; }

// First key tile a block whose first query row is `row0` needs (block-uniform: later rows start later).
__device__ __forceinline__ int attn_first_tile(int row0, int window) {
    return attn_first_key(row0, window) / ATTN_TILE * ATTN_TILE;
}

// Forward. Grid (ceil(seq / blockDim.x), heads, batch); one thread per query row with an online
// softmax over key tiles staged in shared memory, keys attn_first_key(i) ..= i.
template <class T>
__device__ void attn_fwd_impl(T* out, float* lse, const T* qkv, int batch, int seq, int heads, int kv_heads,
                              int head_size, float scale, int window) {
    __shared__ float k_tile[ATTN_TILE * MAX_HEAD];
    __shared__ float v_tile[ATTN_TILE * MAX_HEAD];
    (void)batch;  // the grid's z extent
    const int h = blockIdx.y, b = blockIdx.z;
    const int g = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * head_size;
    const T* base = qkv + (long long)b * seq * stride;
    const T* kp = base + (long long)(heads + g) * head_size;
    const T* vp = base + (long long)(heads + kv_heads + g) * head_size;
    const int row0 = blockIdx.x * blockDim.x;
    const int i = row0 + threadIdx.x;
    const bool live = i < seq;
    float q[MAX_HEAD], acc[MAX_HEAD], s[ATTN_TILE];
    if (live) {
        const T* qp = base + i * stride + (long long)h * head_size;
        for (int d = 0; d < head_size; ++d) q[d] = ld(qp[d]);
    }
    for (int d = 0; d < head_size; ++d) acc[d] = 0.0f;
    float m = neg_inf(), l = 0.0f;
    const int lo = attn_first_key(i, window);
    // Keys from the block's first window ..= the block's last query row (block-uniform bounds).
    int last = row0 + (int)blockDim.x - 1;
    if (last > seq - 1) last = seq - 1;
    for (int t0 = attn_first_tile(row0, window); t0 <= last; t0 += ATTN_TILE) {
        attn_stage(k_tile, v_tile, kp, vp, stride, t0, seq, head_size);
        __syncthreads();
        // The row's keys in this tile: j0 .. cnt (never empty when the condition holds).
        if (live && t0 <= i && t0 + ATTN_TILE > lo) {
            int cnt = i - t0 + 1;
            if (cnt > ATTN_TILE) cnt = ATTN_TILE;
            const int j0 = lo > t0 ? lo - t0 : 0;
            float tile_max = neg_inf();
            for (int jj = j0; jj < cnt; ++jj) {
                const float* kr = k_tile + jj * MAX_HEAD;
                float dot = 0.0f;
                for (int d = 0; d < head_size; ++d) dot += q[d] * kr[d];
                s[jj] = dot * scale;
                tile_max = fmaxf(tile_max, s[jj]);
            }
            const float m_new = fmaxf(m, tile_max);
            const float corr = expf(m - m_new);  // 0 on the first tile (m = -inf)
            l *= corr;
            for (int d = 0; d < head_size; ++d) acc[d] *= corr;
            for (int jj = j0; jj < cnt; ++jj) {
                const float p = expf(s[jj] - m_new);
                l += p;
                const float* vr = v_tile + jj * MAX_HEAD;
                for (int d = 0; d < head_size; ++d) acc[d] += p * vr[d];
            }
            m = m_new;
        }
        __syncthreads();
    }
    if (live) {
        const float inv = 1.0f / l;
        T* op = out + ((long long)b * seq + i) * heads * head_size + (long long)h * head_size;
        for (int d = 0; d < head_size; ++d) st(op + d, acc[d] * inv);
        lse[((long long)b * heads + h) * seq + i] = m + logf(l);
    }
}
extern "C" __global__ void attn_fwd_f32(float* out, float* lse, const float* qkv, int batch, int seq, int heads,
                                        int kv_heads, int head_size, float scale, int window) {
    attn_fwd_impl(out, lse, qkv, batch, seq, heads, kv_heads, head_size, scale, window);
}
extern "C" __global__ void attn_fwd_bf16(bf16* out, float* lse, const bf16* qkv, int batch, int seq, int heads,
                                         int kv_heads, int head_size, float scale, int window) {
    attn_fwd_impl(out, lse, qkv, batch, seq, heads, kv_heads, head_size, scale, window);
}

// delta (batch, heads, seq) = rowsum(grad_out * out) per head: one warp per (b, h, i), its lanes across
// the head (coalesced reads of the row), summed with shuffles in a fixed order.
template <class T>
__device__ void attn_bwd_delta_impl(float* delta, const T* grad_out, const T* out, int batch, int seq, int heads,
                                    int head_size) {
    const long long total = (long long)batch * heads * seq;
    const int lane = threadIdx.x % 32;
    // Warp-uniform bounds: blockDim.x is a multiple of 32.
    for (long long e = global_thread() / 32; e < total; e += global_stride() / 32) {
        const long long i = e % seq, bh = e / seq;
        const long long h = bh % heads, b = bh / heads;
        const long long off = (b * seq + i) * heads * head_size + h * head_size;
        float acc = 0.0f;
        for (int d = lane; d < head_size; d += 32) acc += ld(grad_out[off + d]) * ld(out[off + d]);
        for (int m = 16; m > 0; m >>= 1) acc += shfl_xor(acc, m);
        if (lane == 0) delta[e] = acc;
    }
}
extern "C" __global__ void attn_bwd_delta_f32(float* delta, const float* grad_out, const float* out, int batch,
                                              int seq, int heads, int head_size) {
    attn_bwd_delta_impl(delta, grad_out, out, batch, seq, heads, head_size);
}
extern "C" __global__ void attn_bwd_delta_bf16(float* delta, const bf16* grad_out, const bf16* out, int batch,
                                               int seq, int heads, int head_size) {
    attn_bwd_delta_impl(delta, grad_out, out, batch, seq, heads, head_size);
}

// Query gradient, written into the q part of grad_qkv. Grid (ceil(seq / blockDim.x), heads, batch),
// one thread per query row i: over keys attn_first_key(i) <= j <= i, p = exp(q.k * scale - lse),
// dp = dO.v, ds = p * (dp - delta), dq += ds * k; finally dq *= scale.
template <class T>
__device__ void attn_bwd_dq_impl(T* grad_qkv, const T* grad_out, const T* qkv, const float* lse,
                                 const float* delta, int batch, int seq, int heads, int kv_heads, int head_size,
                                 float scale, int window) {
    __shared__ float k_tile[ATTN_TILE * MAX_HEAD];
    __shared__ float v_tile[ATTN_TILE * MAX_HEAD];
    (void)batch;  // the grid's z extent
    const int h = blockIdx.y, b = blockIdx.z;
    const int g = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * head_size;
    const long long base_off = (long long)b * seq * stride;
    const T* base = qkv + base_off;
    const T* kp = base + (long long)(heads + g) * head_size;
    const T* vp = base + (long long)(heads + kv_heads + g) * head_size;
    const int row0 = blockIdx.x * blockDim.x;
    const int i = row0 + threadIdx.x;
    const bool live = i < seq;
    float q[MAX_HEAD], dout[MAX_HEAD], dq[MAX_HEAD];
    float row_lse = 0.0f, row_delta = 0.0f;
    if (live) {
        const T* qp = base + i * stride + (long long)h * head_size;
        const T* gp = grad_out + ((long long)b * seq + i) * heads * head_size + (long long)h * head_size;
        for (int d = 0; d < head_size; ++d) {
            q[d] = ld(qp[d]);
            dout[d] = ld(gp[d]);
        }
        const long long li = ((long long)b * heads + h) * seq + i;
        row_lse = lse[li];
        row_delta = delta[li];
    }
    for (int d = 0; d < head_size; ++d) dq[d] = 0.0f;
    const int lo = attn_first_key(i, window);
    int last = row0 + (int)blockDim.x - 1;
    if (last > seq - 1) last = seq - 1;
    for (int t0 = attn_first_tile(row0, window); t0 <= last; t0 += ATTN_TILE) {
        attn_stage(k_tile, v_tile, kp, vp, stride, t0, seq, head_size);
        __syncthreads();
        if (live && t0 <= i && t0 + ATTN_TILE > lo) {
            int cnt = i - t0 + 1;
            if (cnt > ATTN_TILE) cnt = ATTN_TILE;
            for (int jj = lo > t0 ? lo - t0 : 0; jj < cnt; ++jj) {
                const float* kr = k_tile + jj * MAX_HEAD;
                const float* vr = v_tile + jj * MAX_HEAD;
                float sc = 0.0f, dp = 0.0f;
                for (int d = 0; d < head_size; ++d) {
                    sc += q[d] * kr[d];
                    dp += dout[d] * vr[d];
                }
                const float p = expf(sc * scale - row_lse);
                const float ds = p * (dp - row_delta);
                for (int d = 0; d < head_size; ++d) dq[d] += ds * kr[d];
            }
        }
        __syncthreads();
    }
    if (live) {
        T* dqp = grad_qkv + base_off + i * stride + (long long)h * head_size;
        for (int d = 0; d < head_size; ++d) st(dqp + d, dq[d] * scale);
    }
}
extern "C" __global__ void attn_bwd_dq_f32(float* grad_qkv, const float* grad_out, const float* qkv,
                                           const float* lse, const float* delta, int batch, int seq, int heads,
                                           int kv_heads, int head_size, float scale, int window) {
    attn_bwd_dq_impl(grad_qkv, grad_out, qkv, lse, delta, batch, seq, heads, kv_heads, head_size, scale, window);
}
extern "C" __global__ void attn_bwd_dq_bf16(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv,
                                            const float* lse, const float* delta, int batch, int seq, int heads,
                                            int kv_heads, int head_size, float scale, int window) {
    attn_bwd_dq_impl(grad_qkv, grad_out, qkv, lse, delta, batch, seq, heads, kv_heads, head_size, scale, window);
}

// Key and value gradients, written into the k and v parts of grad_qkv. Grid
// (ceil(seq / blockDim.x), kv_heads, batch), one thread per key row j of kv head g: over the query
// heads of the group in order, and for each over the query rows j <= i < j + window in order (staged
// in shared tiles with their lse and delta): dv += p * dO_i, dk += p * (dO_i.v - delta_i) * q_i;
// finally dk *= scale. A fixed order and one writer per element: deterministic without atomics.
template <class T>
__device__ void attn_bwd_dkv_impl(T* grad_qkv, const T* grad_out, const T* qkv, const float* lse,
                                  const float* delta, int batch, int seq, int heads, int kv_heads, int head_size,
                                  float scale, int window) {
    __shared__ float q_tile[ATTN_TILE * MAX_HEAD];
    __shared__ float o_tile[ATTN_TILE * MAX_HEAD];
    __shared__ float lse_tile[ATTN_TILE];
    __shared__ float delta_tile[ATTN_TILE];
    (void)batch;  // the grid's z extent
    const int g = blockIdx.y, b = blockIdx.z;
    const int group = heads / kv_heads;
    const long long stride = (long long)(heads + 2 * kv_heads) * head_size;
    const long long out_stride = (long long)heads * head_size;
    const long long base_off = (long long)b * seq * stride;
    const T* base = qkv + base_off;
    const long long k_col = (long long)(heads + g) * head_size;
    const long long v_col = (long long)(heads + kv_heads + g) * head_size;
    const int row0 = blockIdx.x * blockDim.x;
    const int j = row0 + threadIdx.x;
    const bool live = j < seq;
    float k[MAX_HEAD], v[MAX_HEAD], dk[MAX_HEAD], dv[MAX_HEAD];
    if (live) {
        for (int d = 0; d < head_size; ++d) {
            k[d] = ld(base[j * stride + k_col + d]);
            v[d] = ld(base[j * stride + v_col + d]);
        }
    }
    for (int d = 0; d < head_size; ++d) {
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }
    for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        const T* qp = base + (long long)h * head_size;
        const T* gp = grad_out + (long long)b * seq * out_stride + (long long)h * head_size;
        const float* lse_bh = lse + ((long long)b * heads + h) * seq;
        const float* delta_bh = delta + ((long long)b * heads + h) * seq;
        // Query rows from the block's first key row to the last one's window (block-uniform bounds).
        long long rows_end = (long long)row0 + blockDim.x - 1 + window;
        if (rows_end > seq) rows_end = seq;
        for (int t0 = row0; t0 < rows_end; t0 += ATTN_TILE) {
            // Stage q and dO rows t0 .. t0+ATTN_TILE (different row strides), with their lse and delta.
            for (int e = threadIdx.x; e < ATTN_TILE * head_size; e += blockDim.x) {
                const int r = e / head_size, d = e % head_size;
                const int row = t0 + r;
                float a = 0.0f, c = 0.0f;
                if (row < seq) {
                    a = ld(qp[row * stride + d]);
                    c = ld(gp[row * out_stride + d]);
                }
                q_tile[r * MAX_HEAD + d] = a;
                o_tile[r * MAX_HEAD + d] = c;
            }
            for (int r = threadIdx.x; r < ATTN_TILE; r += blockDim.x) {
                const int row = t0 + r;
                lse_tile[r] = row < seq ? lse_bh[row] : 0.0f;
                delta_tile[r] = row < seq ? delta_bh[row] : 0.0f;
            }
            __syncthreads();
            if (live) {
                int first = j - t0;
                if (first < 0) first = 0;
                long long end = (j + (long long)window < seq ? j + (long long)window : seq) - t0;
                if (end > ATTN_TILE) end = ATTN_TILE;
                for (int ii = first; ii < end; ++ii) {
                    const float* qr = q_tile + ii * MAX_HEAD;
                    const float* gr = o_tile + ii * MAX_HEAD;
                    float sc = 0.0f, dp = 0.0f;
                    for (int d = 0; d < head_size; ++d) {
                        sc += qr[d] * k[d];
                        dp += gr[d] * v[d];
                    }
                    const float p = expf(sc * scale - lse_tile[ii]);
                    const float ds = p * (dp - delta_tile[ii]);
                    for (int d = 0; d < head_size; ++d) {
                        dv[d] += p * gr[d];
                        dk[d] += ds * qr[d];
                    }
                }
            }
            __syncthreads();
        }
    }
    if (live) {
        T* row = grad_qkv + base_off + j * stride;
        for (int d = 0; d < head_size; ++d) {
            st(row + k_col + d, dk[d] * scale);
            st(row + v_col + d, dv[d]);
        }
    }
}
extern "C" __global__ void attn_bwd_dkv_f32(float* grad_qkv, const float* grad_out, const float* qkv,
                                            const float* lse, const float* delta, int batch, int seq, int heads,
                                            int kv_heads, int head_size, float scale, int window) {
    attn_bwd_dkv_impl(grad_qkv, grad_out, qkv, lse, delta, batch, seq, heads, kv_heads, head_size, scale, window);
}
extern "C" __global__ void attn_bwd_dkv_bf16(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv,
                                             const float* lse, const float* delta, int batch, int seq, int heads,
                                             int kv_heads, int head_size, float scale, int window) {
    attn_bwd_dkv_impl(grad_qkv, grad_out, qkv, lse, delta, batch, seq, heads, kv_heads, head_size, scale, window);
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core causal attention (bf16 in, fp32 accumulation), through `nvcuda::wmma` 16x16x16 tiles,
// for head sizes D in {32, 64, 128} and sequences that are a multiple of TC_ROWS (the launcher picks
// these kernels then, the kernels above otherwise). Same layouts and results as the kernels above
// (the probabilities are rounded to bf16 before the products with V, as FlashAttention does).
//
// A block is 4 warps (128 threads) over TC_ROWS consecutive rows (queries; keys for dK/dV), 16 rows
// per warp. Products go through shared memory tiles of the warp (`store_matrix_sync`, `__syncwarp`,
// then the lanes work on them); lane `lane` owns row `lane / 2` of a 16-row tile and half of its
// columns, visited in an order skewed by the lane so that the 32 lanes hit 32 different banks.
// Every thread runs to the end and loop bounds are block-uniform (the emulator's barriers need it).
// `wmma` loads and stores need 32-byte aligned addresses: the shared tiles are declared
// `__align__(128)`, and every offset into them and into the activations is a multiple of 16 elements.
#define TC_ROWS 64

// The block of a tensor-core attention kernel. The grid is (heads, or kv heads for dK/dV; batch; row
// blocks). A GPU starts blocks in linear order (x fastest), so the row block, the slowest index, orders
// them, and it orders them heaviest first: under the causal mask a query block's work grows with its
// index (it sees every key before it) and a key block's shrinks (every query after it sees it). The long
// blocks then run in the first waves and the last wave is short ones (less tail idle).
struct TcBlock {
    int rows, y, b;  // row block, head (kv head), sequence
};
// Query row blocks (forward, dQ): the last first.
__device__ __forceinline__ TcBlock tc_query_block() {
    return TcBlock{(int)(gridDim.z - 1 - blockIdx.z), (int)blockIdx.x, (int)blockIdx.y};
}
// Key row blocks (dK/dV): the first first.
__device__ __forceinline__ TcBlock tc_key_block() {
    return TcBlock{(int)blockIdx.z, (int)blockIdx.x, (int)blockIdx.y};
}
// Keys per tile in the forward (staged in shared memory by the block).
#define TC_FWD_KEYS 32
// Keys per tile in the dQ kernel, queries per tile in the dK/dV kernel (whose 2 x D/16 accumulator
// tiles leave fewer registers).
#define TC_BWD 32
#define TC_DKV 16
// Lazy rescaling: a row's running max moves only when a tile's max exceeds it by more than this (in
// natural-log units), so the output accumulator is rarely rescaled. Exact either way: the output is
// divided by a sum taken against the same max.
#define TC_RESCALE 8.0f

namespace wmma = nvcuda::wmma;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> TcA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> TcBRow;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> TcBCol;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> TcC;

// Writes the warp's D/16 accumulator tiles (16 rows x D) times `scale(row)` as bf16 to `dst` (row
// stride `ld`), staged CH tiles at a time through the warp's fp32 tile `stage` (16 x 16*CH). Called by
// the whole warp.
template <int D, int CH, class Scale>
__device__ void tc_write_rows(bf16* dst, long long ld, TcC* acc, float* stage, Scale scale) {
    const int lane = threadIdx.x % 32, r = lane / 2, half = lane % 2;
    const int w = 16 * CH;  // stage width
    for (int c0 = 0; c0 < D / 16; c0 += CH) {
        const int cnt = D / 16 - c0 < CH ? D / 16 - c0 : CH;
        for (int f = 0; f < cnt; ++f) wmma::store_matrix_sync(stage + f * 16, acc[c0 + f], w, wmma::mem_row_major);
        __syncwarp();
        const float sc = scale(r);
        for (int c = 0; c < w / 2; ++c) {
            const int col = half * (w / 2) + ((c + lane) % (w / 2));
            if (col < cnt * 16) dst[r * ld + c0 * 16 + col] = __float2bfloat16(stage[r * w + col] * sc);
        }
        __syncwarp();
    }
}

// 16 bytes from `src` to `dst` (both 16-byte aligned).
__device__ __forceinline__ void copy16(void* dst, const void* src) { st_vec<V16>(dst, ld_vec<V16>(src)); }

// Rows r0 .. r0+ROWS of D bf16 values (global, row stride `stride`) into shared memory (row stride
// D + 8: the padding puts consecutive rows on other banks), in 16-byte pieces by the whole block.
template <int D, int ROWS>
__device__ void tc_stage_rows(bf16* dst, const bf16* src, long long stride) {
    for (int c = threadIdx.x; c < ROWS * D / 8; c += blockDim.x) {
        const int row = c / (D / 8), col = (c % (D / 8)) * 8;
        copy16(dst + row * (D + 8) + col, src + row * stride + col);
    }
}

// The next ROWS rows of k and v into the block's shared tiles, once no warp reads the previous ones; every
// thread sees them on return. Called by the whole block.
template <int D, int ROWS>
__device__ void tc_stage_kv(bf16* k_sm, bf16* v_sm, const bf16* k_src, const bf16* v_src, long long stride) {
    __syncthreads();  // the previous tile is no longer read
    tc_stage_rows<D, ROWS>(k_sm, k_src, stride);
    tc_stage_rows<D, ROWS>(v_sm, v_src, stride);
    __syncthreads();
}

// acc[dd] (16 x D) += A (16 x K: bf16 in shared memory, leading dimension K) times B (K rows of D values in
// global memory, row stride ld): a warp's probability or gradient tile times rows of v, k, q or dO.
template <int D, int K>
__device__ void tc_acc_tile_rows(TcC* acc, const bf16* a, const bf16* b, long long ld) {
    for (int kk = 0; kk < K / 16; ++kk) {
        TcA af;
        wmma::load_matrix_sync(af, a + kk * 16, K);
        for (int dd = 0; dd < D / 16; ++dd) {
            TcBRow bf;
            wmma::load_matrix_sync(bf, b + (long long)kk * 16 * ld + dd * 16, ld);
            wmma::mma_sync(acc[dd], af, bf, acc[dd]);
        }
    }
}

// The other lane of the caller's row: its value of `v` (through the warp's 32-float exchange area).
__device__ __forceinline__ float tc_partner(float v, float* xch) {
    const int lane = threadIdx.x % 32;
    xch[lane] = v;
    __syncwarp();
    const float o = xch[lane ^ 1];
    __syncwarp();
    return o;
}

// Forward. Grid (heads, batch, seq / TC_ROWS), block 128. Per tile of TC_FWD_KEYS keys, staged in
// shared memory by the whole block: s = q.k^T, online softmax (lazy rescaling), o += p v. A warp skips
// the tiles that lie wholly after its rows (causal mask).
template <int D>
__device__ void attn_fwd_tc_impl(bf16* out, float* lse, const bf16* qkv, int seq, int heads, int kv_heads,
                                 float scale) {
    constexpr int KEYS = TC_FWD_KEYS, LD = D + 8;
    __shared__ __align__(128) bf16 k_sm[KEYS * LD];
    __shared__ __align__(128) bf16 v_sm[KEYS * LD];
    __shared__ __align__(128) float s_sm[4][16 * KEYS];
    __shared__ __align__(128) bf16 p_sm[4][16 * KEYS];
    __shared__ float alpha_sm[4][16];
    __shared__ float xch_sm[4][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 2, half = lane % 2;
    const TcBlock blk = tc_query_block();
    const int h = blk.y, b = blk.b, g = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const bf16* kbase = base + (long long)(heads + g) * D;
    const bf16* vbase = base + (long long)(heads + kv_heads + g) * D;
    const int q0 = blk.rows * TC_ROWS + warp * 16, i = q0 + r;
    float* S = s_sm[warp];
    bf16* P = p_sm[warp];
    TcA qf[D / 16];
    for (int kk = 0; kk < D / 16; ++kk)
        wmma::load_matrix_sync(qf[kk], base + (long long)q0 * stride + (long long)h * D + kk * 16, stride);
    TcC of[D / 16];
    for (int dd = 0; dd < D / 16; ++dd) wmma::fill_fragment(of[dd], 0.0f);
    float m = neg_inf(), l = 0.0f;  // of row r (both of its lanes hold them)
    // Key tiles up to the block's last row (block-uniform: every thread meets every barrier).
    const int tiles = (blk.rows + 1) * TC_ROWS / KEYS;
    for (int kb = 0; kb < tiles; ++kb) {
        const int k0 = kb * KEYS;
        tc_stage_kv<D, KEYS>(k_sm, v_sm, kbase + (long long)k0 * stride, vbase + (long long)k0 * stride, stride);
        if (k0 > q0 + 15) continue;  // warp-uniform: every key of the tile is after every row
        for (int nn = 0; nn < KEYS / 16; ++nn) {
            TcC sf;
            wmma::fill_fragment(sf, 0.0f);
            for (int kk = 0; kk < D / 16; ++kk) {
                TcBCol kf;
                wmma::load_matrix_sync(kf, k_sm + nn * 16 * LD + kk * 16, LD);
                wmma::mma_sync(sf, qf[kk], kf, sf);
            }
            wmma::store_matrix_sync(S + nn * 16, sf, KEYS, wmma::mem_row_major);
        }
        __syncwarp();
        float tmax = neg_inf();
        for (int c = 0; c < KEYS / 2; ++c) {
            const int col = half * (KEYS / 2) + ((c + lane) % (KEYS / 2));
            if (k0 + col <= i) tmax = fmaxf(tmax, S[r * KEYS + col] * scale);
        }
        tmax = fmaxf(tmax, tc_partner(tmax, xch_sm[warp]));
        // A row whose keys in this tile are all masked keeps its max (tmax = -inf).
        const float m_new = tmax > m + TC_RESCALE || (m == neg_inf() && tmax != neg_inf()) ? fmaxf(m, tmax) : m;
        const float alpha = m_new == m ? 1.0f : __expf(m - m_new);  // 0 on the row's first keys
        float psum = 0.0f;
        for (int c = 0; c < KEYS / 2; ++c) {
            const int col = half * (KEYS / 2) + ((c + lane) % (KEYS / 2));
            const float p = k0 + col <= i ? __expf(S[r * KEYS + col] * scale - m_new) : 0.0f;
            psum += p;
            P[r * KEYS + col] = __float2bfloat16(p);
        }
        psum += tc_partner(psum, xch_sm[warp]);
        l = l * alpha + psum;
        m = m_new;
        if (half == 0) alpha_sm[warp][r] = alpha;
        __syncwarp();
        bool rescale = false;
        for (int rr = 0; rr < 16; ++rr) rescale = rescale || alpha_sm[warp][rr] != 1.0f;
        if (rescale) {
            // O *= alpha per row, through the (now free) score tile, KEYS/16 accumulator tiles at a time.
            for (int c0 = 0; c0 < D / 16; c0 += KEYS / 16) {
                for (int f = 0; f < KEYS / 16; ++f)
                    wmma::store_matrix_sync(S + f * 16, of[c0 + f], KEYS, wmma::mem_row_major);
                __syncwarp();
                for (int c = 0; c < KEYS / 2; ++c) {
                    const int col = half * (KEYS / 2) + ((c + lane) % (KEYS / 2));
                    S[r * KEYS + col] *= alpha;
                }
                __syncwarp();
                for (int f = 0; f < KEYS / 16; ++f)
                    wmma::load_matrix_sync(of[c0 + f], S + f * 16, KEYS, wmma::mem_row_major);
                __syncwarp();
            }
        }
        tc_acc_tile_rows<D, KEYS>(of, P, v_sm, LD);
        __syncwarp();
    }
    __syncwarp();
    const float inv = 1.0f / l;
    tc_write_rows<D, KEYS / 16>(out + ((long long)b * seq + q0) * heads * D + (long long)h * D, (long long)heads * D,
                                of, S, [&](int) { return inv; });
    if (half == 0) lse[((long long)b * heads + h) * seq + i] = m + logf(l);
}

// Query gradient (the q part of grad_qkv). Grid (heads, batch, seq / TC_ROWS), block 128: per tile
// of TC_BWD keys (k and v staged in shared memory by the block), s = q.k, dp = dO.v,
// ds = exp(s * scale - lse) * (dp - delta), dq += ds k. A warp skips the tiles wholly after its rows.
template <int D>
__device__ void attn_bwd_dq_tc_impl(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv, const float* lse,
                                    const float* delta, int seq, int heads, int kv_heads, float scale) {
    constexpr int T = TC_BWD, LD = D + 8;
    __shared__ __align__(128) bf16 k_sm[T * LD];
    __shared__ __align__(128) bf16 v_sm[T * LD];
    __shared__ __align__(128) float s_sm[4][16 * T];
    __shared__ __align__(128) float dp_sm[4][16 * T];
    __shared__ __align__(128) bf16 ds_sm[4][16 * T];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 2, half = lane % 2;
    const TcBlock blk = tc_query_block();
    const int h = blk.y, b = blk.b, g = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * D, ostride = (long long)heads * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const bf16* kbase = base + (long long)(heads + g) * D;
    const bf16* vbase = base + (long long)(heads + kv_heads + g) * D;
    const int q0 = blk.rows * TC_ROWS + warp * 16, i = q0 + r;
    const bf16* go = grad_out + ((long long)b * seq + q0) * ostride + (long long)h * D;
    float *S = s_sm[warp], *DP = dp_sm[warp];
    bf16* DS = ds_sm[warp];
    TcA qf[D / 16], gf[D / 16];
    for (int kk = 0; kk < D / 16; ++kk) {
        wmma::load_matrix_sync(qf[kk], base + (long long)q0 * stride + (long long)h * D + kk * 16, stride);
        wmma::load_matrix_sync(gf[kk], go + kk * 16, ostride);
    }
    TcC dq[D / 16];
    for (int dd = 0; dd < D / 16; ++dd) wmma::fill_fragment(dq[dd], 0.0f);
    const long long li = ((long long)b * heads + h) * seq + i;
    const float row_lse = lse[li], row_delta = delta[li];
    // Key tiles up to the block's last row (block-uniform: every thread meets every barrier).
    const int tiles = (blk.rows + 1) * TC_ROWS / T;
    for (int kb = 0; kb < tiles; ++kb) {
        const int k0 = kb * T;
        tc_stage_kv<D, T>(k_sm, v_sm, kbase + (long long)k0 * stride, vbase + (long long)k0 * stride, stride);
        if (k0 > q0 + 15) continue;  // warp-uniform: every key of the tile is after every row
        for (int nn = 0; nn < T / 16; ++nn) {
            TcC sf, pf;
            wmma::fill_fragment(sf, 0.0f);
            wmma::fill_fragment(pf, 0.0f);
            for (int kk = 0; kk < D / 16; ++kk) {
                TcBCol kf, vf;
                wmma::load_matrix_sync(kf, k_sm + nn * 16 * LD + kk * 16, LD);
                wmma::mma_sync(sf, qf[kk], kf, sf);
                wmma::load_matrix_sync(vf, v_sm + nn * 16 * LD + kk * 16, LD);
                wmma::mma_sync(pf, gf[kk], vf, pf);
            }
            wmma::store_matrix_sync(S + nn * 16, sf, T, wmma::mem_row_major);
            wmma::store_matrix_sync(DP + nn * 16, pf, T, wmma::mem_row_major);
        }
        __syncwarp();
        for (int c = 0; c < T / 2; ++c) {
            const int col = half * (T / 2) + ((c + lane) % (T / 2));
            const int e = r * T + col;
            float ds = 0.0f;
            if (k0 + col <= i) ds = __expf(S[e] * scale - row_lse) * (DP[e] - row_delta);
            DS[e] = __float2bfloat16(ds);
        }
        __syncwarp();
        tc_acc_tile_rows<D, T>(dq, DS, k_sm, LD);
        __syncwarp();
    }
    tc_write_rows<D, T / 16>(grad_qkv + ((long long)b * seq + q0) * stride + (long long)h * D, stride, dq, S,
                             [&](int) { return scale; });
}

// Key and value gradients (the k and v parts of grad_qkv), summed over the query heads of the kv
// head in head order. Grid (kv_heads, batch, seq / TC_ROWS), block 128: per query head and tile of
// TC_DKV queries from the block's first key on (q and dO staged in shared memory by the block),
// p^T = exp(k.q * scale - lse), dp^T = v.dO, ds^T = p^T (dp^T - delta); dv += p^T dO, dk += ds^T q.
// A warp skips the tiles wholly before its keys.
template <int D>
__device__ void attn_bwd_dkv_tc_impl(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv, const float* lse,
                                     const float* delta, int seq, int heads, int kv_heads, float scale) {
    constexpr int T = TC_DKV, LD = D + 8;
    __shared__ __align__(128) bf16 q_sm[T * LD];
    __shared__ __align__(128) bf16 g_sm[T * LD];
    __shared__ __align__(128) float s_sm[4][16 * T];
    __shared__ __align__(128) float dp_sm[4][16 * T];
    __shared__ __align__(128) bf16 p_sm[4][16 * T];
    __shared__ __align__(128) bf16 ds_sm[4][16 * T];
    __shared__ float q_lse[T], q_delta[T];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 2, half = lane % 2;
    const TcBlock blk = tc_key_block();
    const int gk = blk.y, b = blk.b, group = heads / kv_heads;
    const long long stride = (long long)(heads + 2 * kv_heads) * D, ostride = (long long)heads * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const int key0 = blk.rows * TC_ROWS + warp * 16, j = key0 + r;
    const bf16* krows = base + (long long)key0 * stride + (long long)(heads + gk) * D;
    const bf16* vrows = base + (long long)key0 * stride + (long long)(heads + kv_heads + gk) * D;
    float *S = s_sm[warp], *DP = dp_sm[warp];
    bf16 *PT = p_sm[warp], *DST = ds_sm[warp];
    TcC dk[D / 16], dv[D / 16];
    for (int dd = 0; dd < D / 16; ++dd) {
        wmma::fill_fragment(dk[dd], 0.0f);
        wmma::fill_fragment(dv[dd], 0.0f);
    }
    for (int hq = gk * group; hq < (gk + 1) * group; ++hq) {
        const bf16* qbase = base + (long long)hq * D;
        const bf16* gbase = grad_out + (long long)b * seq * ostride + (long long)hq * D;
        const float* lse_h = lse + ((long long)b * heads + hq) * seq;
        const float* delta_h = delta + ((long long)b * heads + hq) * seq;
        for (int q0 = blk.rows * TC_ROWS; q0 < seq; q0 += T) {
            __syncthreads();  // the previous tile is no longer read
            if (threadIdx.x < T) {
                q_lse[threadIdx.x] = lse_h[q0 + threadIdx.x];
                q_delta[threadIdx.x] = delta_h[q0 + threadIdx.x];
            }
            tc_stage_rows<D, T>(q_sm, qbase + (long long)q0 * stride, stride);
            tc_stage_rows<D, T>(g_sm, gbase + (long long)q0 * ostride, ostride);
            __syncthreads();
            if (q0 + T - 1 < key0) continue;  // warp-uniform: every query of the tile is before every key
            {
                // Each k and v tile of the warp is loaded once per query tile (outer loops over the
                // head dimension), one product at a time (fewer live registers).
                TcC sf[T / 16], pf[T / 16];
                for (int nn = 0; nn < T / 16; ++nn) {
                    wmma::fill_fragment(sf[nn], 0.0f);
                    wmma::fill_fragment(pf[nn], 0.0f);
                }
                for (int kk = 0; kk < D / 16; ++kk) {
                    TcA kf;
                    wmma::load_matrix_sync(kf, krows + kk * 16, stride);
                    for (int nn = 0; nn < T / 16; ++nn) {
                        TcBCol qf;
                        wmma::load_matrix_sync(qf, q_sm + nn * 16 * LD + kk * 16, LD);
                        wmma::mma_sync(sf[nn], kf, qf, sf[nn]);
                    }
                }
                for (int kk = 0; kk < D / 16; ++kk) {
                    TcA vf;
                    wmma::load_matrix_sync(vf, vrows + kk * 16, stride);
                    for (int nn = 0; nn < T / 16; ++nn) {
                        TcBCol gf;
                        wmma::load_matrix_sync(gf, g_sm + nn * 16 * LD + kk * 16, LD);
                        wmma::mma_sync(pf[nn], vf, gf, pf[nn]);
                    }
                }
                for (int nn = 0; nn < T / 16; ++nn) {
                    wmma::store_matrix_sync(S + nn * 16, sf[nn], T, wmma::mem_row_major);
                    wmma::store_matrix_sync(DP + nn * 16, pf[nn], T, wmma::mem_row_major);
                }
            }
            __syncwarp();
            for (int c = 0; c < T / 2; ++c) {
                const int col = half * (T / 2) + ((c + lane) % (T / 2));
                const int e = r * T + col;
                float p = 0.0f, ds = 0.0f;
                if (j <= q0 + col) {
                    p = __expf(S[e] * scale - q_lse[col]);
                    ds = p * (DP[e] - q_delta[col]);
                }
                PT[e] = __float2bfloat16(p);
                DST[e] = __float2bfloat16(ds);
            }
            __syncwarp();
            tc_acc_tile_rows<D, T>(dv, PT, g_sm, LD);
            tc_acc_tile_rows<D, T>(dk, DST, q_sm, LD);
            __syncwarp();
        }
    }
    const long long rows = (long long)b * seq * stride + (long long)key0 * stride;
    tc_write_rows<D, T / 16>(grad_qkv + rows + (long long)(heads + gk) * D, stride, dk, S,
                             [&](int) { return scale; });
    tc_write_rows<D, T / 16>(grad_qkv + rows + (long long)(heads + kv_heads + gk) * D, stride, dv, S,
                             [&](int) { return 1.0f; });
}

// The entry points of a tensor-core family F for head size D, with the same parameters as the
// one-thread-per-row kernels (batch is the grid's y extent, head_size is D): attn_fwd_<IMPL>_impl,
// attn_bwd_dq_<IMPL>_impl and attn_bwd_dkv_<IMPL>_impl, the forward with the template arguments FWD and
// the backward with BWD (parenthesized lists: `(D)`, or `(D, tile)` for mma).
#define ATTN_TEMPLATE_ARGS(...) __VA_ARGS__
#define ATTN_TC_KERNELS(F, IMPL, D, FWD, BWD)                                                                                 \
    extern "C" __global__ void attn_fwd_##F##_d##D(bf16* out, float* lse, const bf16* qkv, int batch, int seq,                \
                                                   int heads, int kv_heads, int head_size, float scale) {                     \
        attn_fwd_##IMPL##_impl<ATTN_TEMPLATE_ARGS FWD>(out, lse, qkv, seq, heads, kv_heads, scale);                           \
    }                                                                                                                         \
    extern "C" __global__ void attn_bwd_dq_##F##_d##D(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv,                  \
                                                      const float* lse, const float* delta, int batch, int seq,               \
                                                      int heads, int kv_heads, int head_size, float scale) {                  \
        attn_bwd_dq_##IMPL##_impl<ATTN_TEMPLATE_ARGS BWD>(grad_qkv, grad_out, qkv, lse, delta, seq, heads, kv_heads, scale);  \
    }                                                                                                                         \
    extern "C" __global__ void attn_bwd_dkv_##F##_d##D(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv,                 \
                                                       const float* lse, const float* delta, int batch, int seq,              \
                                                       int heads, int kv_heads, int head_size, float scale) {                 \
        attn_bwd_dkv_##IMPL##_impl<ATTN_TEMPLATE_ARGS BWD>(grad_qkv, grad_out, qkv, lse, delta, seq, heads, kv_heads, scale); \
    }
ATTN_TC_KERNELS(tc, tc, 32, (32), (32))
ATTN_TC_KERNELS(tc, tc, 64, (64), (64))
ATTN_TC_KERNELS(tc, tc, 128, (128), (128))

// ---------------------------------------------------------------------------------------------------
// Causal attention on tensor cores through `mma.sync` m16n8k16 (bf16 in, fp32 accumulation), with the
// scores, probabilities and gradients of a tile kept in registers (FlashAttention-2's layout): the
// accumulator fragment of two adjacent 16x8 products is the A fragment of the next product, so nothing
// goes through shared memory but the staged k/v (q/dO) rows. Same semantics and parameters as the
// kernels above; bf16, head sizes 32/64/128, seq a multiple of MMA_ROWS.
//
// A block is 4 warps over MMA_ROWS consecutive rows (queries; keys for dK/dV), 16 per warp. In every
// fragment lane `lane` owns rows g = lane / 4 and g + 8 of the warp's 16, and columns 2q, 2q + 1
// (q = lane % 4) of each 8-column tile; row statistics are reduced over the 4 lanes of a row with
// shuffles. Scores are kept in log2 units (scale * log2 e) for exp2f. Every thread runs to the end and
// loop bounds are block-uniform (every thread meets every barrier).
#define MMA_ROWS 64
// The staged tile (the kernels' TILE): keys per tile in the forward and dQ kernels, queries per tile in
// the dK/dV kernel (whose block keeps its k and v rows in shared memory and double-buffers its q and dO
// tiles in dynamic shared memory). Tiles are double-buffered: the next one is copied (cp.async) while the
// warps work on this one. The `mma64` family stages 64 (half the barriers and softmax rescales per row,
// more registers) in the forward, and in the dQ and dK/dV kernels at head sizes 32 and 64 (at 128 their
// registers would spill: there they are the `mma` kernels).
#define MMA_TILE 32
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// d (16x8 fp32, 4 per lane) += a (16x16 bf16, 4 registers) times b (16x8 bf16, 2 registers).
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b) {
#ifdef FAST_LLM_EMU
    emu_mma16816(d, a, b);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// A fragment of the 16x16 tile at p (row-major, leading dimension ld).
__device__ __forceinline__ void mma_load_a(unsigned* a, const bf16* p, long long ld) {
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    a[0] = ld_pair(p + g * ld + 2 * q);
    a[1] = ld_pair(p + (g + 8) * ld + 2 * q);
    a[2] = ld_pair(p + g * ld + 2 * q + 8);
    a[3] = ld_pair(p + (g + 8) * ld + 2 * q + 8);
}
// `ldmatrix` x4 from shared memory: this lane gives `row`, the address of row lane % 8 of 8x8 matrix
// lane / 8; register j receives this lane's two elements of matrix j (transposed with TRANS), in the
// layout of an mma fragment. Volatile: it reads what other threads wrote before a barrier.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(unsigned* r, const bf16* row) {
#ifdef FAST_LLM_EMU
    emu_ldmatrix_x4(r, row, TRANS);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#endif
}
// The A fragment of the 16x16 tile at p in shared memory (row-major, leading dimension ld).
__device__ __forceinline__ void ldsm_a(unsigned* a, const bf16* p, int ld) {
    const int lane = threadIdx.x % 32, j = lane / 8, i = lane % 8;
    ldsm_x4<false>(a, p + ((j % 2) * 8 + i) * ld + (j / 2) * 8);
}
// B fragments of two adjacent 8-column tiles of B, from the 16x16 tile of M at p in shared memory
// (row-major, leading dimension ld). TRANS = false: B = M^T (M's rows are B's columns: keys for
// q.k^T); TRANS = true: B = M (M's rows are B's k dimension: rows of v, k, q or dO).
template <bool TRANS>
__device__ __forceinline__ void ldsm_b2(unsigned* b0, unsigned* b1, const bf16* p, int ld) {
    const int lane = threadIdx.x % 32, j = lane / 8, i = lane % 8;
    const int row = TRANS ? (j % 2) * 8 + i : (j / 2) * 8 + i, col = TRANS ? (j / 2) * 8 : (j % 2) * 8;
    unsigned r[4];
    ldsm_x4<TRANS>(r, p + row * ld + col);
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}
// BYTES (16, or 4) from global to shared memory without going through registers (cp.async; 16 bytes
// bypass L1); complete after `cp_async_wait` (the emulator holds the copy back until then). Both
// addresses aligned to BYTES.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
    static_assert(BYTES == 16 || BYTES == 4, "cp.async of 16 or 4 bytes");
#ifdef FAST_LLM_EMU
    emu_cp_async(dst, src, BYTES);
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
#endif
}
// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef FAST_LLM_EMU
    emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef FAST_LLM_EMU
    emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// Starts copying rows 0 .. ROWS of D values (global, row stride `stride`) into shared memory (row
// stride D + 8), 16 bytes per cp.async, by the whole block (the caller commits the group).
template <int D, int ROWS>
__device__ void cp_async_rows(bf16* dst, const bf16* src, long long stride) {
    for (int c = threadIdx.x; c < ROWS * D / 8; c += blockDim.x) {
        const int row = c / (D / 8), col = (c % (D / 8)) * 8;
        cp_async<16>(dst + row * (D + 8) + col, src + row * stride + col);
    }
}
// Starts copying rows 0 .. ROWS of k and v into shared tiles, as one committed group.
template <int D, int ROWS>
__device__ void mma_stage_kv_async(bf16* k_dst, bf16* v_dst, const bf16* k_src, const bf16* v_src, long long stride) {
    cp_async_rows<D, ROWS>(k_dst, k_src, stride);
    cp_async_rows<D, ROWS>(v_dst, v_src, stride);
    cp_async_commit();
}
// Double-buffered tiles, called by the whole block at the top of iteration kb of `tiles` (tile kb was
// started by the previous call, or before the loop for kb = 0): once no warp reads the other buffer
// any more, `stage_next(kb + 1)` starts copying tile kb + 1 into it (one committed group); returns when
// tile kb has landed for every thread.
template <class StageNext>
__device__ void mma_tile_ready(int kb, int tiles, StageNext stage_next) {
    __syncthreads();  // the other buffer (the previous tile) is no longer read
    if (kb + 1 < tiles) {
        stage_next(kb + 1);
        cp_async_wait<1>();  // this tile has landed, the next one may still be in flight
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();  // every thread's part of this tile is visible
}
// Double-buffered k/v tiles of KEYS keys (forward and dQ): `mma_tile_ready` with tile kb + 1 of k and
// v into `k_buf[(kb + 1) & 1]` and `v_buf[(kb + 1) & 1]`.
template <int D, int KEYS>
__device__ void mma_kv_tile_ready(bf16 (*k_buf)[KEYS * (D + 8)], bf16 (*v_buf)[KEYS * (D + 8)], const bf16* kbase,
                                  const bf16* vbase, long long stride, int kb, int tiles) {
    mma_tile_ready(kb, tiles, [&](int next) {
        const long long off = (long long)next * KEYS * stride;
        mma_stage_kv_async<D, KEYS>(k_buf[next & 1], v_buf[next & 1], kbase + off, vbase + off, stride);
    });
}
// The accumulators of two adjacent 16x8 tiles (columns 0-7 and 8-15) as the A fragment of a 16x16 tile.
__device__ __forceinline__ void mma_c_to_a(unsigned* a, const float* c0, const float* c1) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}
// acc (16 x KEYS, KEYS/8 accumulator tiles) = A (the warp's 16 rows of D values, D/16 A fragments in
// registers) times the transpose of KEYS rows of D values at m in shared memory (leading dimension ld):
// q.k^T, dO.v^T.
template <int D, int KEYS>
__device__ __forceinline__ void mma_rows_t(float (*acc)[4], const unsigned (*a)[4], const bf16* m, int ld) {
    for (int nt = 0; nt < KEYS / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    for (int kk = 0; kk < D / 16; ++kk)
        for (int nt = 0; nt < KEYS / 8; nt += 2) {
            unsigned b0[2], b1[2];
            ldsm_b2<false>(b0, b1, m + nt * 8 * ld + kk * 16, ld);
            mma16816(acc[nt], a[kk], b0);
            mma16816(acc[nt + 1], a[kk], b1);
        }
}
// acc (16 x D, D/8 accumulator tiles) += C (16 x K: the K/8 accumulator tiles of a previous product, as
// bf16) times K rows of D values at m in shared memory (leading dimension ld): p v, ds k, p^T dO, ds^T q.
template <int D, int K>
__device__ __forceinline__ void mma_acc_rows(float (*acc)[4], float (*c)[4], const bf16* m, int ld) {
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a[4];
        mma_c_to_a(a, c[2 * kk], c[2 * kk + 1]);
        for (int dt = 0; dt < D / 8; dt += 2) {
            unsigned b0[2], b1[2];
            ldsm_b2<true>(b0, b1, m + kk * 16 * ld + dt * 8, ld);
            mma16816(acc[dt], a, b0);
            mma16816(acc[dt + 1], a, b1);
        }
    }
}
// Writes the warp's D/8 accumulator tiles (16 rows x D) times `scale` as bf16 to dst (row stride ld).
template <int D>
__device__ void mma_write_rows(bf16* dst, long long ld, float (*acc)[4], float scale) {
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    for (int dt = 0; dt < D / 8; ++dt) {
        st_pair(dst + g * ld + dt * 8 + 2 * q, acc[dt][0] * scale, acc[dt][1] * scale);
        st_pair(dst + (g + 8) * ld + dt * 8 + 2 * q, acc[dt][2] * scale, acc[dt][3] * scale);
    }
}

// Dynamic shared memory of the forward with tiles of KEYS keys (`mma_fwd_shared_bytes` in ops.rs
// computes the same): two buffers of k rows and two of v rows.
template <int D, int KEYS>
constexpr int mma_fwd_shared_bytes() {
    return 4 * KEYS * (D + 8) * 2;
}

// Forward. Grid (heads, batch, seq / MMA_ROWS), block 128, `mma_fwd_shared_bytes<D, KEYS>()` bytes of
// dynamic shared memory (past 48 KiB for 64 keys of head size 128). Per tile of KEYS keys (k and v
// staged by the block, double-buffered): s = q.k^T, online softmax, o += p v, all in registers. A warp
// skips the tiles wholly after its rows.
template <int D, int KEYS>
__device__ void attn_fwd_mma_impl(bf16* out, float* lse, const bf16* qkv, int seq, int heads, int kv_heads,
                                  float scale) {
    static_assert(MMA_ROWS % KEYS == 0, "a row block is a whole number of key tiles");
    constexpr int LD = D + 8;
    typedef bf16 Tile[KEYS * LD];
    DYNAMIC_SHARED(smem, (mma_fwd_shared_bytes<D, KEYS>()));
    Tile* k_buf = reinterpret_cast<Tile*>(smem);  // [2]
    Tile* v_buf = k_buf + 2;                      // [2]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, qd = lane % 4;
    const TcBlock blk = tc_query_block();
    const int h = blk.y, b = blk.b, grp = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const bf16* kbase = base + (long long)(heads + grp) * D;
    const bf16* vbase = base + (long long)(heads + kv_heads + grp) * D;
    const int q0 = blk.rows * MMA_ROWS + warp * 16, row_a = q0 + g, row_b = q0 + g + 8;
    const float sl = scale * LOG2E;
    unsigned qa[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk) mma_load_a(qa[kk], base + (long long)q0 * stride + (long long)h * D + kk * 16, stride);
    float o[D / 8][4];
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    // Running max (log2 units) of rows a and b, and this lane's part of their sums.
    float m_a = neg_inf(), m_b = neg_inf(), l_a = 0.0f, l_b = 0.0f;
    const int tiles = (blk.rows + 1) * MMA_ROWS / KEYS;
    mma_stage_kv_async<D, KEYS>(k_buf[0], v_buf[0], kbase, vbase, stride);
    for (int kb = 0; kb < tiles; ++kb) {
        const int k0 = kb * KEYS;
        const bf16 *k_sm = k_buf[kb & 1], *v_sm = v_buf[kb & 1];
        mma_kv_tile_ready<D, KEYS>(k_buf, v_buf, kbase, vbase, stride, kb, tiles);
        if (k0 > q0 + 15) continue;  // warp-uniform: every key of the tile is after every row
        // Warp-uniform: every key of the tile is at or before every row (no mask to apply).
        const bool unmasked = k0 + KEYS - 1 <= q0;
        float s[KEYS / 8][4];
        mma_rows_t<D, KEYS>(s, qa, k_sm, LD);
        float mx_a = neg_inf(), mx_b = neg_inf();
        for (int nt = 0; nt < KEYS / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + nt * 8 + 2 * qd + (e & 1);
                const bool a = e < 2;
                const float v = unmasked || key <= (a ? row_a : row_b) ? s[nt][e] * sl : neg_inf();
                s[nt][e] = v;
                if (a) mx_a = fmaxf(mx_a, v);
                else mx_b = fmaxf(mx_b, v);
            }
        mx_a = fmaxf(mx_a, shfl_xor(mx_a, 1));
        mx_a = fmaxf(mx_a, shfl_xor(mx_a, 2));
        mx_b = fmaxf(mx_b, shfl_xor(mx_b, 1));
        mx_b = fmaxf(mx_b, shfl_xor(mx_b, 2));
        // Every row sees key 0 in the first tile, so the new max is finite; alpha is 0 on the first tile.
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float al_a = exp2f(m_a - mn_a), al_b = exp2f(m_b - mn_b);
        m_a = mn_a;
        m_b = mn_b;
        l_a *= al_a;
        l_b *= al_b;
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= al_a;
            o[dt][1] *= al_a;
            o[dt][2] *= al_b;
            o[dt][3] *= al_b;
        }
        for (int nt = 0; nt < KEYS / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - (e < 2 ? m_a : m_b));  // masked: exp2(-inf) = 0
                s[nt][e] = p;
                if (e < 2) l_a += p;
                else l_b += p;
            }
        mma_acc_rows<D, KEYS>(o, s, v_sm, LD);
    }
    l_a += shfl_xor(l_a, 1);
    l_a += shfl_xor(l_a, 2);
    l_b += shfl_xor(l_b, 1);
    l_b += shfl_xor(l_b, 2);
    const long long ostride = (long long)heads * D;
    bf16* orow = out + ((long long)b * seq + q0) * ostride + (long long)h * D;
    const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
    for (int dt = 0; dt < D / 8; ++dt) {
        st_pair(orow + g * ostride + dt * 8 + 2 * qd, o[dt][0] * inv_a, o[dt][1] * inv_a);
        st_pair(orow + (g + 8) * ostride + dt * 8 + 2 * qd, o[dt][2] * inv_b, o[dt][3] * inv_b);
    }
    if (qd == 0) {
        float* lrow = lse + ((long long)b * heads + h) * seq;
        lrow[row_a] = (m_a + log2f(l_a)) * LN2;
        lrow[row_b] = (m_b + log2f(l_b)) * LN2;
    }
}

// Query gradient (the q part of grad_qkv). Grid (heads, batch, seq / MMA_ROWS), block 128: per staged
// tile of KEYS keys (double-buffered): s = q.k^T, dp = dO.v^T, ds = p (dp - delta) with
// p = exp(s * scale - lse), dq += ds k. A warp skips the keys wholly after its rows.
template <int D, int KEYS>
__device__ void attn_bwd_dq_mma_impl(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv, const float* lse,
                                     const float* delta, int seq, int heads, int kv_heads, float scale) {
    static_assert(MMA_ROWS % KEYS == 0, "a row block is a whole number of key tiles");
    constexpr int LD = D + 8;
    __shared__ __align__(16) bf16 k_buf[2][KEYS * LD];
    __shared__ __align__(16) bf16 v_buf[2][KEYS * LD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, qd = lane % 4;
    const TcBlock blk = tc_query_block();
    const int h = blk.y, b = blk.b, grp = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * D, ostride = (long long)heads * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const bf16* kbase = base + (long long)(heads + grp) * D;
    const bf16* vbase = base + (long long)(heads + kv_heads + grp) * D;
    const int q0 = blk.rows * MMA_ROWS + warp * 16, row_a = q0 + g, row_b = q0 + g + 8;
    const float sl = scale * LOG2E;
    const bf16* go = grad_out + ((long long)b * seq + q0) * ostride + (long long)h * D;
    unsigned qa[D / 16][4], ga[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk) {
        mma_load_a(qa[kk], base + (long long)q0 * stride + (long long)h * D + kk * 16, stride);
        mma_load_a(ga[kk], go + kk * 16, ostride);
    }
    float dq[D / 8][4];
    for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;
    const float* lrow = lse + ((long long)b * heads + h) * seq;
    const float* drow = delta + ((long long)b * heads + h) * seq;
    const float lse_a = lrow[row_a] * LOG2E, lse_b = lrow[row_b] * LOG2E;
    const float d_a = drow[row_a], d_b = drow[row_b];
    const int tiles = (blk.rows + 1) * MMA_ROWS / KEYS;
    mma_stage_kv_async<D, KEYS>(k_buf[0], v_buf[0], kbase, vbase, stride);
    for (int kb = 0; kb < tiles; ++kb) {
        const int k0 = kb * KEYS;
        const bf16 *k_sm = k_buf[kb & 1], *v_sm = v_buf[kb & 1];
        mma_kv_tile_ready<D, KEYS>(k_buf, v_buf, kbase, vbase, stride, kb, tiles);
        if (k0 > q0 + 15) continue;  // warp-uniform: every key of the tile is after every row
        const bool unmasked = k0 + KEYS - 1 <= q0;  // warp-uniform, as in the forward
        float s[KEYS / 8][4], dp[KEYS / 8][4];
        mma_rows_t<D, KEYS>(s, qa, k_sm, LD);
        mma_rows_t<D, KEYS>(dp, ga, v_sm, LD);
        for (int nt = 0; nt < KEYS / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + nt * 8 + 2 * qd + (e & 1);
                const bool a = e < 2;
                float ds = 0.0f;
                if (unmasked || key <= (a ? row_a : row_b))
                    ds = exp2f(s[nt][e] * sl - (a ? lse_a : lse_b)) * (dp[nt][e] - (a ? d_a : d_b));
                s[nt][e] = ds;
            }
        mma_acc_rows<D, KEYS>(dq, s, k_sm, LD);
    }
    mma_write_rows<D>(grad_qkv + ((long long)b * seq + q0) * stride + (long long)h * D, stride, dq, scale);
}

// The stored-ds backward (`attn_bwd_dkvs_*` then `attn_bwd_dqs_*`): the dK/dV kernel also stores ds^T
// (bf16), and the query gradient is dq = ds k read back from it, instead of the dQ kernel's three
// products (s and dp recomputed): 5 products in all instead of 7, for a scratch of one bf16 tile of
// MMA_ROWS x MMA_ROWS per (query block, key block) pair at or below the diagonal, per sequence and query
// head. Deterministic: dq sums its key tiles in order. Tile (qb, kb), kb <= qb, of head h of sequence b
// starts at element `ds_tile` and holds ds^T: MMA_ROWS rows of keys, each of MMA_ROWS queries.
//
// Which entries are written: the dK/dV kernel stores every tile of QT queries a warp does not skip
// (masked entries as 0, since p = 0 there), and skips only tiles wholly before its 16 keys. The dQ
// kernel below reads a key tile into the A fragments of a warp only when the tile starts at or before
// the warp's last row, with the same tile size (QT = KEYS): such entries were all stored. Entries of a
// diagonal tile that no warp stores are staged in shared memory but never loaded into a fragment.
__device__ __forceinline__ long long ds_tile(int b, int h, int heads, int seq, int qb, int kb) {
    const long long nb = seq / MMA_ROWS, tri = nb * (nb + 1) / 2;
    return (((long long)b * heads + h) * tri + (long long)qb * (qb + 1) / 2 + kb) * (MMA_ROWS * MMA_ROWS);
}
// Dynamic shared memory of the dK/dV kernel with tiles of QT queries (`mma_dkv_shared_bytes` in ops.rs
// computes the same): the block's k and v rows, two buffers of q and dO rows, two of lse and delta.
template <int D, int QT>
constexpr int mma_dkv_shared_bytes() {
    return (2 * MMA_ROWS + 4 * QT) * (D + 8) * 2 + 4 * QT * 4;
}

// Key and value gradients (the k and v parts of grad_qkv), summed over the query heads of the kv head
// in head order. Grid (kv_heads, batch, seq / MMA_ROWS), block 128, `mma_dkv_shared_bytes<D, QT>()` bytes of
// dynamic shared memory: the block's k and v rows are staged once; then, per query head and tile of
// QT queries from the block's first key on, double-buffered (q, dO, lse and delta of the next tile
// are copied while the warps work on this one): s^T = k.q^T, dp^T = v.dO^T, p^T = exp(s^T * scale - lse),
// ds^T = p^T (dp^T - delta); dv += p^T dO, dk += ds^T q. A warp skips the tiles wholly before its keys.
template <int D, int QT, bool STORE_DS = false>
__device__ void attn_bwd_dkv_mma_impl(bf16* grad_qkv, const bf16* grad_out, const bf16* qkv, const float* lse,
                                      const float* delta, int seq, int heads, int kv_heads, float scale,
                                      bf16* ds = nullptr) {
    static_assert(MMA_ROWS % QT == 0, "a row block is a whole number of query tiles");
    constexpr int LD = D + 8;
    DYNAMIC_SHARED(smem, (mma_dkv_shared_bytes<D, QT>()));
    bf16* k_sm = reinterpret_cast<bf16*>(smem);
    bf16* v_sm = k_sm + MMA_ROWS * LD;
    bf16* q_buf = v_sm + MMA_ROWS * LD;  // [2][QT * LD]
    bf16* g_buf = q_buf + 2 * QT * LD;   // [2][QT * LD]
    float* stat_buf = reinterpret_cast<float*>(g_buf + 2 * QT * LD);  // [2][lse QT | delta QT]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, qd = lane % 4;
    const TcBlock blk = tc_key_block();
    const int gk = blk.y, b = blk.b, group = heads / kv_heads;
    const long long stride = (long long)(heads + 2 * kv_heads) * D, ostride = (long long)heads * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const int block_key0 = blk.rows * MMA_ROWS, key0 = block_key0 + warp * 16;
    const int key_a = key0 + g, key_b = key0 + g + 8;
    const float sl = scale * LOG2E;
    // Tile `it` is query head gk * group + it / per_head, queries from block_key0 + (it % per_head) * QT.
    const int per_head = (seq - block_key0) / QT, tiles = group * per_head;
    auto stage = [&](int it) {
        const int hq = gk * group + it / per_head, q0 = block_key0 + (it % per_head) * QT, buf = it & 1;
        cp_async_rows<D, QT>(q_buf + buf * QT * LD, base + (long long)q0 * stride + (long long)hq * D, stride);
        cp_async_rows<D, QT>(g_buf + buf * QT * LD,
                             grad_out + ((long long)b * seq + q0) * ostride + (long long)hq * D, ostride);
        if (threadIdx.x < QT) {
            const long long row = ((long long)b * heads + hq) * seq + q0 + threadIdx.x;
            cp_async<4>(stat_buf + buf * 2 * QT + threadIdx.x, lse + row);
            cp_async<4>(stat_buf + buf * 2 * QT + QT + threadIdx.x, delta + row);
        }
        cp_async_commit();
    };
    mma_stage_kv_async<D, MMA_ROWS>(k_sm, v_sm, base + (long long)block_key0 * stride + (long long)(heads + gk) * D,
                                    base + (long long)block_key0 * stride + (long long)(heads + kv_heads + gk) * D,
                                    stride);
    stage(0);
    const bf16* kw = k_sm + warp * 16 * LD;
    const bf16* vw = v_sm + warp * 16 * LD;
    float dk[D / 8][4], dv[D / 8][4];
    for (int dt = 0; dt < D / 8; ++dt)
        for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.0f;
    for (int it = 0; it < tiles; ++it) {
        mma_tile_ready(it, tiles, stage);
        const int q0 = block_key0 + (it % per_head) * QT;
        if (q0 + QT - 1 < key0) continue;  // warp-uniform: every query of the tile is before every key
        const bool unmasked = key0 + 15 <= q0;  // warp-uniform: every query at or after every key
        const bf16* q_sm = q_buf + (it & 1) * QT * LD;
        const bf16* g_sm = g_buf + (it & 1) * QT * LD;
        const float* q_lse = stat_buf + (it & 1) * 2 * QT;
        const float* q_delta = q_lse + QT;
        float s[QT / 8][4], dp[QT / 8][4];
        for (int nt = 0; nt < QT / 8; ++nt)
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned ka[4], va[4];
            ldsm_a(ka, kw + kk * 16, LD);
            ldsm_a(va, vw + kk * 16, LD);
            for (int nt = 0; nt < QT / 8; nt += 2) {
                unsigned b0[2], b1[2];
                ldsm_b2<false>(b0, b1, q_sm + nt * 8 * LD + kk * 16, LD);
                mma16816(s[nt], ka, b0);
                mma16816(s[nt + 1], ka, b1);
                ldsm_b2<false>(b0, b1, g_sm + nt * 8 * LD + kk * 16, LD);
                mma16816(dp[nt], va, b0);
                mma16816(dp[nt + 1], va, b1);
            }
        }
        for (int nt = 0; nt < QT / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int col = nt * 8 + 2 * qd + (e & 1);
                float p = 0.0f;
                if (unmasked || (e < 2 ? key_a : key_b) <= q0 + col) p = exp2f(s[nt][e] * sl - q_lse[col] * LOG2E);
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - q_delta[col]);
            }
        if (STORE_DS) {
            // ds^T of this warp's 16 keys and the tile's queries, as the bf16 the products below use,
            // into the (query block, key block) tile of the head's stored ds (`ds_tile`).
            const int hq = gk * group + it / per_head;
            bf16* t = ds + ds_tile(b, hq, heads, seq, q0 / MMA_ROWS, blk.rows) + (q0 % MMA_ROWS);
            for (int nt = 0; nt < QT / 8; ++nt) {
                st_pair(t + (warp * 16 + g) * MMA_ROWS + nt * 8 + 2 * qd, dp[nt][0], dp[nt][1]);
                st_pair(t + (warp * 16 + g + 8) * MMA_ROWS + nt * 8 + 2 * qd, dp[nt][2], dp[nt][3]);
            }
        }
        mma_acc_rows<D, QT>(dv, s, g_sm, LD);
        mma_acc_rows<D, QT>(dk, dp, q_sm, LD);
    }
    const long long rows = (long long)b * seq * stride + (long long)key0 * stride;
    mma_write_rows<D>(grad_qkv + rows + (long long)(heads + gk) * D, stride, dk, scale);
    mma_write_rows<D>(grad_qkv + rows + (long long)(heads + kv_heads + gk) * D, stride, dv, 1.0f);
}

// The A fragment of the 16x16 tile whose transpose is at p in shared memory (row-major, leading
// dimension ld): `ldmatrix.trans` of the transposed 8x8 blocks.
__device__ __forceinline__ void ldsm_a_t(unsigned* a, const bf16* p, int ld) {
    const int lane = threadIdx.x % 32, j = lane / 8, i = lane % 8;
    ldsm_x4<true>(a, p + ((j / 2) * 8 + i) * ld + (j % 2) * 8);
}

// Query gradient from the stored ds. Grid (heads, batch, seq / MMA_ROWS), block 128: per key tile of
// KEYS keys (k rows and the block's ds^T rows staged by the block, double-buffered): dq += ds k. A warp
// skips the keys wholly after its rows.
template <int D, int KEYS>
__device__ void attn_bwd_dqs_mma_impl(bf16* grad_qkv, const bf16* ds, const bf16* qkv, int seq, int heads,
                                      int kv_heads, float scale) {
    static_assert(MMA_ROWS % KEYS == 0, "a row block is a whole number of key tiles");
    constexpr int LD = D + 8, LDS = MMA_ROWS + 8;
    __shared__ __align__(16) bf16 k_buf[2][KEYS * LD];
    __shared__ __align__(16) bf16 s_buf[2][KEYS * LDS];
    const int warp = threadIdx.x / 32;
    const TcBlock blk = tc_query_block();
    const int h = blk.y, b = blk.b, grp = h / (heads / kv_heads);
    const long long stride = (long long)(heads + 2 * kv_heads) * D;
    const bf16* base = qkv + (long long)b * seq * stride;
    const bf16* kbase = base + (long long)(heads + grp) * D;
    const int q0 = blk.rows * MMA_ROWS + warp * 16;
    auto stage = [&](int kb) {
        const int k0 = kb * KEYS;
        cp_async_rows<D, KEYS>(k_buf[kb & 1], kbase + (long long)k0 * stride, stride);
        cp_async_rows<MMA_ROWS, KEYS>(
            s_buf[kb & 1], ds + ds_tile(b, h, heads, seq, blk.rows, k0 / MMA_ROWS) + (k0 % MMA_ROWS) * MMA_ROWS,
            MMA_ROWS);
        cp_async_commit();
    };
    float dq[D / 8][4];
    for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;
    const int tiles = (blk.rows + 1) * MMA_ROWS / KEYS;
    stage(0);
    for (int kb = 0; kb < tiles; ++kb) {
        mma_tile_ready(kb, tiles, stage);
        if (kb * KEYS > q0 + 15) continue;  // warp-uniform: every key of the tile is after every row
        const bf16 *k_sm = k_buf[kb & 1], *s_sm = s_buf[kb & 1] + warp * 16;
        for (int kk = 0; kk < KEYS / 16; ++kk) {
            unsigned a[4];
            ldsm_a_t(a, s_sm + kk * 16 * LDS, LDS);
            for (int dt = 0; dt < D / 8; dt += 2) {
                unsigned b0[2], b1[2];
                ldsm_b2<true>(b0, b1, k_sm + kk * 16 * LD + dt * 8, LD);
                mma16816(dq[dt], a, b0);
                mma16816(dq[dt + 1], a, b1);
            }
        }
    }
    mma_write_rows<D>(grad_qkv + ((long long)b * seq + q0) * stride + (long long)h * D, stride, dq, scale);
}

// The stored-ds entry points of the mma family F for head size D and tile T.
#define ATTN_DS_KERNELS(F, D, T)                                                                              \
    extern "C" __global__ void attn_bwd_dkvs_##F##_d##D(bf16* grad_qkv, bf16* ds, const bf16* grad_out,       \
                                                        const bf16* qkv, const float* lse, const float* delta,  \
                                                        int batch, int seq, int heads, int kv_heads,            \
                                                        int head_size, float scale) {                           \
        attn_bwd_dkv_mma_impl<D, T, true>(grad_qkv, grad_out, qkv, lse, delta, seq, heads, kv_heads, scale, ds); \
    }                                                                                                         \
    extern "C" __global__ void attn_bwd_dqs_##F##_d##D(bf16* grad_qkv, const bf16* ds, const bf16* qkv,        \
                                                       int batch, int seq, int heads, int kv_heads,             \
                                                       int head_size, float scale) {                            \
        attn_bwd_dqs_mma_impl<D, T>(grad_qkv, ds, qkv, seq, heads, kv_heads, scale);                          \
    }

// The entry points of the mma family F for head size D: the forward with tiles of FWD keys, the
// backward (recomputing, and with the stored ds) with tiles of T (keys in dQ, queries in dK/dV).
#define ATTN_MMA_KERNELS(F, D, FWD, T)           \
    ATTN_TC_KERNELS(F, mma, D, (D, FWD), (D, T)) \
    ATTN_DS_KERNELS(F, D, T)
ATTN_MMA_KERNELS(mma, 32, MMA_TILE, MMA_TILE)
ATTN_MMA_KERNELS(mma, 64, MMA_TILE, MMA_TILE)
ATTN_MMA_KERNELS(mma, 128, MMA_TILE, MMA_TILE)
// mma64: 64 keys per forward tile at every head size (in dynamic shared memory past 48 KiB at 128); the
// dQ and dK/dV kernels at head size 128 keep tiles of 32 (64 would spill their registers).
ATTN_MMA_KERNELS(mma64, 32, 64, 64)
ATTN_MMA_KERNELS(mma64, 64, 64, 64)
ATTN_MMA_KERNELS(mma64, 128, 64, MMA_TILE)

// ---------------------------------------------------------------------------------------------------
// AdamW on fp32 master weights, the CPU backend's formula in the same operation order:
// g = grad * grad_scale; w -= lr*wd*w; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
// w -= lr * (m / bias_corr_1) / (sqrt(v / bias_corr_2) + eps), with bias_corr_k = 1 - beta_k^step
// computed on the host in f64 and rounded to fp32. With CAST (`adamw_f32_to_bf16`) the new weights
// are also stored as bf16 to `out` (the weight buffer's compute copy: the next restore's cast, fused),
// 8 elements per step so that the bf16 stores are 16 bytes too.
template <bool CAST>
struct AdamStepElem {
    typedef float T;
};
template <>
struct AdamStepElem<true> {
    typedef bf16 T;
};
template <bool CAST>
__device__ void adamw_impl(float* w, const float* grad, float* exp_avg, float* exp_avg_sq, bf16* out, long long n,
                           float lr, float beta_1, float beta_2, float eps, float weight_decay, float grad_scale,
                           float bias_corr_1, float bias_corr_2) {
    const float lr_wd = lr * weight_decay;
    const float one_m_b1 = 1.0f - beta_1, one_m_b2 = 1.0f - beta_2;
    // New (w, m, v) of one element from its (w, grad, m, v).
    auto step = [&](float wi, float gr, float& m, float& v) {
        const float g = gr * grad_scale;
        wi -= lr_wd * wi;
        m = beta_1 * m + one_m_b1 * g;
        v = beta_2 * v + one_m_b2 * g * g;
        return wi - lr * (m / bias_corr_1) / (sqrtf(v / bias_corr_2) + eps);
    };
    const bool vec = vec_aligned(w) && vec_aligned(grad) && vec_aligned(exp_avg) && vec_aligned(exp_avg_sq) &&
                     (!CAST || vec_aligned(out));
    for_vec<typename AdamStepElem<CAST>::T>(n, vec, [&](long long i, auto width) {
        constexpr int W = decltype(width)::value;
        float wi[W], gr[W], m[W], v[W];
        ldw<W>(w + i, wi);
        ldw<W>(grad + i, gr);
        ldw<W>(exp_avg + i, m);
        ldw<W>(exp_avg_sq + i, v);
        for (int k = 0; k < W; ++k) wi[k] = step(wi[k], gr[k], m[k], v[k]);
        stw<W>(exp_avg + i, m);
        stw<W>(exp_avg_sq + i, v);
        stw<W>(w + i, wi);
        if constexpr (CAST) stw<W>(out + i, wi);
    });
}
extern "C" __global__ void adamw_f32(float* w, const float* grad, float* exp_avg, float* exp_avg_sq, long long n,
                                     float lr, float beta_1, float beta_2, float eps, float weight_decay,
                                     float grad_scale, float bias_corr_1, float bias_corr_2) {
    adamw_impl<false>(w, grad, exp_avg, exp_avg_sq, nullptr, n, lr, beta_1, beta_2, eps, weight_decay, grad_scale,
                      bias_corr_1, bias_corr_2);
}
extern "C" __global__ void adamw_f32_to_bf16(float* w, const float* grad, float* exp_avg, float* exp_avg_sq,
                                             bf16* out, long long n, float lr, float beta_1, float beta_2,
                                             float eps, float weight_decay, float grad_scale, float bias_corr_1,
                                             float bias_corr_2) {
    adamw_impl<true>(w, grad, exp_avg, exp_avg_sq, out, n, lr, beta_1, beta_2, eps, weight_decay, grad_scale,
                     bias_corr_1, bias_corr_2);
}

// ---------------------------------------------------------------------------------------------------
// Sum of squares in double: sum_squares_partial writes one fixed-order partial sum per block
// (partial has gridDim.x entries), sum_doubles (one block) adds `count` partials into out[0].
// Deterministic for a given grid and block size.
template <class T>
__device__ void sum_squares_partial_impl(double* partial, const T* x, long long n) {
    __shared__ double red[MAX_BLOCK];
    double acc = 0.0;
    const long long stride = global_stride();
    // Four loads in flight per thread; the squares are added in the order of a plain grid-stride loop.
    for (long long i = global_thread(); i < n; i += 4 * stride) {
        float v[4];
        for (int u = 0; u < 4; ++u) v[u] = i + u * stride < n ? ld(x[i + u * stride]) : 0.0f;
        for (int u = 0; u < 4; ++u) {
            const double d = v[u];
            acc += d * d;
        }
    }
    acc = block_sum_double(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
extern "C" __global__ void sum_squares_partial_f32(double* partial, const float* x, long long n) {
    sum_squares_partial_impl(partial, x, n);
}
extern "C" __global__ void sum_squares_partial_bf16(double* partial, const bf16* x, long long n) {
    sum_squares_partial_impl(partial, x, n);
}

extern "C" __global__ void sum_doubles(double* out, const double* partial, int count) {
    __shared__ double red[MAX_BLOCK];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = block_sum_double(acc, red);
    if (threadIdx.x == 0) out[0] = acc;
}

// ---------------------------------------------------------------------------------------------------
// Every kernel, for the emulator's name table: the tensor-core families' nine each (ATTN_TC_KERNELS at
// head sizes 32, 64 and 128), then the others.
#define EMU_ATTN_FAMILY(X, F)                                                                                 \
    X(attn_fwd_##F##_d32) X(attn_fwd_##F##_d64) X(attn_fwd_##F##_d128) X(attn_bwd_dq_##F##_d32)               \
    X(attn_bwd_dq_##F##_d64) X(attn_bwd_dq_##F##_d128) X(attn_bwd_dkv_##F##_d32) X(attn_bwd_dkv_##F##_d64)     \
    X(attn_bwd_dkv_##F##_d128)
#define EMU_DS_FAMILY(X, F)                                                                                   \
    X(attn_bwd_dkvs_##F##_d32) X(attn_bwd_dkvs_##F##_d64) X(attn_bwd_dkvs_##F##_d128) X(attn_bwd_dqs_##F##_d32) \
    X(attn_bwd_dqs_##F##_d64) X(attn_bwd_dqs_##F##_d128)
#define EMU_KERNELS(X)                                                                                        \
    EMU_ATTN_FAMILY(X, tc) EMU_ATTN_FAMILY(X, mma) EMU_ATTN_FAMILY(X, mma64)                                  \
    EMU_DS_FAMILY(X, mma) EMU_DS_FAMILY(X, mma64)                                                             \
    X(cast_f32_to_bf16) X(cast_bf16_to_f32) X(add_f32) X(add_bf16) X(embedding_fwd_f32) X(embedding_fwd_bf16) \
    X(embedding_bwd_partial_f32) X(embedding_bwd_partial_bf16) X(embedding_bwd_sum) X(rms_norm_fwd_f32) X(rms_norm_fwd_bf16) X(rms_norm_bwd_dx_f32) \
    X(rms_norm_bwd_dx_bf16) X(rms_norm_bwd_dw_f32) X(rms_norm_bwd_dw_bf16) X(rms_norm_bwd_f32) X(rms_norm_bwd_bf16) X(sum_chunks_f32) X(rotary_f32) X(rotary_bf16)      \
    X(head_norm_fwd_f32) X(head_norm_fwd_bf16) X(head_norm_bwd_dx_f32) X(head_norm_bwd_dx_bf16) X(head_norm_bwd_dw_f32) X(head_norm_bwd_dw_bf16) \
    X(swiglu_fwd_f32) X(swiglu_fwd_bf16) X(swiglu_bwd_f32) X(swiglu_bwd_bf16) X(cross_entropy_f32)            \
    X(cross_entropy_bf16) X(attn_fwd_f32) X(attn_fwd_bf16) X(attn_bwd_delta_f32) X(attn_bwd_delta_bf16)       \
    X(attn_bwd_dq_f32) X(attn_bwd_dq_bf16) X(attn_bwd_dkv_f32) X(attn_bwd_dkv_bf16) X(adamw_f32) X(adamw_f32_to_bf16) \
    X(sum_squares_partial_f32) X(sum_squares_partial_bf16) X(sum_doubles)
