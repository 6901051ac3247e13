// vision_pool.cu: the projector's first two steps for each image: k x k average pooling of the g x g
// grid of post-LayerNorm patch states (float32), then RMSNorm with (1 + w) (mm_soft_emb_norm), written in
// T for the projection product (cuBLAS). One block per pooled token. DRAFT.
#include "vision_common.cuh"
#include "vision_kernels.cuh"

namespace g3cuda {
namespace vision {

template <typename T>
__global__ void pool_rmsnorm_kernel(T* out, const float* y, const float* w, int g, int k, int H, float eps) {
  extern __shared__ float pooled[];  // [H]
  const int t = g / k;
  const int tok = blockIdx.x, img = blockIdx.y;
  const int oy = tok / t, ox = tok % t;
  const float inv = 1.f / (float)(k * k);
  const float* base = y + (size_t)img * g * g * H;
  double ss = 0.0;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float acc = 0.f;
    for (int dy = 0; dy < k; ++dy)
      for (int dx = 0; dx < k; ++dx) acc += base[((size_t)(oy * k + dy) * g + ox * k + dx) * H + i];
    acc *= inv;
    pooled[i] = acc;
    ss += (double)acc * acc;
  }
  const float r = (float)(1.0 / sqrt(block_sum(ss) / H + (double)eps));
  T* o = out + ((size_t)img * t * t + tok) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = vt<T>(pooled[i] * r * (1.f + w[i]));
}

template <typename T>
void vision_pool_rmsnorm(T* out, const float* y, const float* w, int n_img, int g, int k, int H, float eps,
                         cudaStream_t s) {
  if (n_img <= 0) return;
  const int t = g / k;
  pool_rmsnorm_kernel<T><<<dim3(t * t, n_img), 256, H * sizeof(float), s>>>(out, y, w, g, k, H, eps);
  G3V_LAUNCH_CHECK("vision_pool_rmsnorm");
}

template void vision_pool_rmsnorm<float>(float*, const float*, const float*, int, int, int, int, float, cudaStream_t);
template void vision_pool_rmsnorm<bf16>(bf16*, const float*, const float*, int, int, int, int, float, cudaStream_t);

}  // namespace vision
}  // namespace g3cuda
