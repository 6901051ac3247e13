// vision_pool.cu: the multimodal projector's first two steps, per image: k x k average pooling of the
// g x g grid of post-LayerNorm patch states (float32), then the soft-embedding RMSNorm with (1 + w),
// written in bf16 for the projection product. One block per pooled token; the pooled row waits in
// shared memory for its norm.
#include "vision_kernels.cuh"

namespace g3cuda {

__global__ void vision_pool_rmsnorm_kernel(bf16* out, const float* y, const float* w, int g, int k, int H, float eps) {
  G3_PDL_ENTRY();
  extern __shared__ float pooled[];  // [H]
  __shared__ double sh[33];
  const int t = g / k, tok = blockIdx.x, img = blockIdx.y;
  const int oy = tok / t, ox = tok % t;
  const float inv = 1.f / (float)(k * k);
  const float* base = y + (int64_t)img * g * g * H;
  double ss = 0.0;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float acc = 0.f;
    for (int dy = 0; dy < k; ++dy)
      for (int dx = 0; dx < k; ++dx) acc += base[((int64_t)(oy * k + dy) * g + ox * k + dx) * H + i];
    acc *= inv;
    pooled[i] = acc;
    ss += (double)acc * acc;
  }
  const float r = (float)(1.0 / sqrt(block_sum(ss, sh) / H + (double)eps));
  bf16* o = out + ((int64_t)img * t * t + tok) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = __float2bfloat16_rn(pooled[i] * r * (1.f + w[i]));
}

void vision_pool_rmsnorm(bf16* out, const float* y, const float* w, int n_img, int g, int k, int H, float eps,
                         cudaStream_t s) {
  if (n_img <= 0) return;
  if (k <= 0 || g % k) throw std::invalid_argument("vision_pool_rmsnorm: grid must be a multiple of the pool size");
  const int t = g / k;
  const size_t smem = (size_t)H * sizeof(float);
  if (smem > 48 * 1024) throw std::invalid_argument("vision_pool_rmsnorm: hidden size above 12288");
  launch_k(vision_pool_rmsnorm_kernel, dim3(t * t, n_img), 256, smem, s, out, y, w, g, k, H, eps);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
