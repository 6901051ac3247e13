// scatter_rows.cu: multimodal prompts in the text engine: the image embeddings replace the scaled token
// embeddings of the <image_soft_token> rows of the batch (x is the float32 residual stream).
#include "vision_kernels.cuh"

namespace g3cuda {

__global__ void scatter_rows_kernel(float* x, const float* src, const int32_t* rows, int H) {
  G3_PDL_ENTRY();
  const int e = blockIdx.x;
  const float* s = src + (int64_t)e * H;
  float* d = x + (int64_t)rows[e] * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) d[i] = s[i];
}

void scatter_rows(float* x, const float* src, const int32_t* rows, int n, int H, cudaStream_t s) {
  if (n <= 0) return;
  launch_k(scatter_rows_kernel, n, 256, 0, s, x, src, rows, H);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
