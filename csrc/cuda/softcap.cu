// softcap.cu: logit soft-capping, x = tanh(x / cap) * cap (Gemma 2's final logits).
#include "kernels.cuh"

namespace g3cuda {

__global__ void softcap_kernel(float* x, int64_t n, float cap) {
  G3_PDL_ENTRY();
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x)
    x[k] = tanhf(x[k] / cap) * cap;
}

void softcap(float* x, int64_t n, float cap, cudaStream_t s) {
  if (n <= 0) return;
  const int blocks = (int)std::min<int64_t>((n + 255) / 256, 132 * 16);
  launch_k(softcap_kernel, blocks, 256, 0, s, x, n, cap);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
