// Placeholder until the kernel set lands (wt-cuda).
#ifndef FAST_LLM_EMU
#include <cuda_bf16.h>
#endif
extern "C" __global__ void add_f32(float* out, const float* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) out[i] += x[i];
}
extern "C" __global__ void add_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) out[i] = __float2bfloat16(__bfloat162float(out[i]) + __bfloat162float(x[i]));
}
