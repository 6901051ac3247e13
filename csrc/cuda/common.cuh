// common.cuh: shared pieces of the CUDA kernels: error checks, the element type T (float or bf16)
// with its load/store helpers, warp/block reductions, and the ring-buffer write rule of the KV cache.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace g3cuda {

using bf16 = __nv_bfloat16;

inline void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error at ") + file + ":" + std::to_string(line) + " (" + what +
                             "): " + cudaGetErrorString(e));
}
#define CUDA_CHECK(x) ::g3cuda::check_cuda((x), #x, __FILE__, __LINE__)
// After every launch: catches bad launch configurations at once (no sync).
#define CUDA_LAUNCH_CHECK() ::g3cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `sh` holds 33 doubles. Double: the norm statistic is then exact to float32 whatever the order,
// as in the CPU kernels.
__device__ __forceinline__ double block_sum(double v, double* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    double s = lane < nw ? sh[lane] : 0.0;
    s = warp_sum(s);
    if (lane == 0) sh[32] = s;
  }
  __syncthreads();
  return sh[32];
}

// KV-cache ring rule (see engine.cu): a chunk's new key/value at position `pos`, index `idx` within
// its chunk, may go straight into the cache before attention iff no query of the chunk still needs
// what its slot holds: always on global layers (no wrap), and on local layers for the chunk's first
// token (its slot held pos - cap, which no query of the chunk sees) or while the ring is unfilled.
__device__ __forceinline__ bool kv_direct_ok(bool local, int idx, int pos, int cap) {
  return !local || idx == 0 || pos < cap;
}

// Per-forward metadata on the device (one H2D copy per forward; inside the decode graph).
struct SeqMeta {
  const int32_t* slot;   // [B]
  const int32_t* start;  // [B] positions already cached
  const int32_t* len;    // [B] new tokens
  const int32_t* t0;     // [B] first row of the sequence's tokens
};
struct TokMeta {
  const int32_t* pos;  // [T] absolute position
  const int32_t* seq;  // [T] sequence index b
};

}  // namespace g3cuda
