// gemv_chunk.cuh: the inner step of the decode GEMVs (gemm.cu's gemv_bf16_kernel, gemv_qkv_rope.cu): one lane's
// 16-byte chunk c of R weight rows (8 bf16 each, already loaded) against the same chunk of M activation rows
// (from shared memory when the block made x itself, else from global memory), accumulated in float32 in a
// fixed order, so that both kernels sum alike.
#pragma once
#include "common.cuh"

namespace g3cuda {

template <int M, int R, int U, bool SHARED_X>
__device__ __forceinline__ void gemv_chunk_fma(float (&acc)[R][M], const uint4 (&wv)[R][U], int u, const bf16* x,
                                               int K, int c) {
  float wf[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) bf16x8_to_f(wv[r][u], wf[r]);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4 xv = SHARED_X ? *reinterpret_cast<const uint4*>(x + m * K + c * 8)
                              : __ldg(reinterpret_cast<const uint4*>(x + (int64_t)m * K) + c);
    float xf[8];
    bf16x8_to_f(xv, xf);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
  }
}

}  // namespace g3cuda
