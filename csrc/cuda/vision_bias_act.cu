// vision_bias_act.cu: the elementwise steps after SigLIP's biased products (the products are cuBLAS with
// bf16 outputs): the q/k/v bias added while splitting the stacked product into per-head, zero-padded
// rows for the attention kernel; fc1's bias + gelu_tanh in place. (The o and fc2 biases are folded into
// the residual add of vision_layernorm.)
#include "vision_kernels.cuh"

namespace g3cuda {

static int grid_for(int64_t n) { return (int)std::min<int64_t>((n + 255) / 256, 65536); }

// One thread per element of qh, in qh's order (coalesced writes; reads coalesced along d).
__global__ void vision_qkv_split_kernel(bf16* qh, const bf16* qkv, const float* bias, int n_img, int N, int heads,
                                        int D, int64_t total) {
  G3_PDL_ENTRY();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int d = (int)(i % kVisionDP);
    int64_t r = i / kVisionDP;
    const int n = (int)(r % N);
    r /= N;
    const int h = (int)(r % heads);
    r /= heads;
    const int img = (int)(r % n_img);
    const int which = (int)(r / n_img);  // 0 q, 1 k, 2 v
    float v = 0.f;
    if (d < D) {
      const int col = (which * heads + h) * D + d;
      v = __bfloat162float(qkv[((int64_t)img * N + n) * (3 * heads * D) + col]) + bias[col];
    }
    qh[i] = __float2bfloat16_rn(v);
  }
}

__device__ __forceinline__ float gelu_tanh_f(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__global__ void vision_bias_gelu_kernel(bf16* h, const float* bias, int64_t n, int cols) {
  G3_PDL_ENTRY();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    h[i] = __float2bfloat16_rn(gelu_tanh_f(__bfloat162float(h[i]) + bias[i % cols]));
}

void vision_qkv_bias_split(bf16* qh, const bf16* qkv, const float* bias, int n_img, int N, int heads, int D,
                           cudaStream_t s) {
  if (D > kVisionDP) throw std::invalid_argument("vision_qkv_bias_split: head_dim must be <= 80");
  const int64_t total = (int64_t)3 * n_img * heads * N * kVisionDP;
  if (total <= 0) return;
  launch_k(vision_qkv_split_kernel, grid_for(total), 256, 0, s, qh, qkv, bias, n_img, N, heads, D, total);
  CUDA_LAUNCH_CHECK();
}

void vision_bias_gelu(bf16* h, const float* bias, int rows, int cols, cudaStream_t s) {
  const int64_t n = (int64_t)rows * cols;
  if (n <= 0) return;
  launch_k(vision_bias_gelu_kernel, grid_for(n), 256, 0, s, h, bias, n, cols);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
