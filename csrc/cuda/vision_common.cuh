// vision_common.cuh: small helpers of the vision CUDA kernels (self-contained: conversions, block sums,
// launch checks). DRAFT, see vision_kernels.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace g3cuda {
namespace vision {

inline void vcheck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error (") + what + "): " + cudaGetErrorString(e));
}
#define G3V_LAUNCH_CHECK(what) ::g3cuda::vision::vcheck(cudaGetLastError(), what)

__device__ __forceinline__ float vf(float x) { return x; }
__device__ __forceinline__ float vf(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T vt(float x);
template <> __device__ __forceinline__ float vt<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 vt<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets the total.
template <typename V>
__device__ __forceinline__ V block_sum(V v) {
  __shared__ V part[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // part[] may still be read from a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  V t = lane < nw ? part[lane] : V(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

}  // namespace vision
}  // namespace g3cuda
