// avgpool.cpp: k x k average pooling of a square token grid (torch.nn.AvgPool2d with stride = kernel)
// and the Gemma 3 multimodal projector built on it: pool the 64x64 SigLIP grid to 16x16, RMSNorm with
// (1 + w) (mm_soft_emb_norm), then project to the text model's width (mm_input_projection_weight).
#include <algorithm>
#include "kernels.h"

namespace g3 {

void avg_pool_cpu(float* out, const float* x, int grid, int dim, int k) {
  const int t = grid / k;
  const float inv = 1.f / (float)(k * k);
#pragma omp parallel for schedule(static) if (t * t > 4)
  for (int o = 0; o < t * t; ++o) {
    const int oy = o / t, ox = o % t;
    float* dst = out + (int64_t)o * dim;
    std::fill(dst, dst + dim, 0.f);
    for (int y = 0; y < k; ++y)
      for (int xx = 0; xx < k; ++xx) {
        const float* src = x + ((int64_t)(oy * k + y) * grid + ox * k + xx) * dim;
        for (int i = 0; i < dim; ++i) dst[i] += src[i];
      }
    for (int i = 0; i < dim; ++i) dst[i] *= inv;
  }
}

void mm_projector_cpu(float* out, const float* x, int grid, int Hv, int k, const float* norm_w, float eps,
                      const WeightView& w, float* scratch) {
  const int t = grid / k;
  float* pooled = scratch;
  float* normed = scratch + (size_t)t * t * Hv;
  avg_pool_cpu(pooled, x, grid, Hv, k);
  rmsnorm_cpu(normed, Hv, pooled, Hv, norm_w, t * t, Hv, eps);
  matmul_cpu(out, normed, w, t * t, Hv, (int)w.rows);
}

}  // namespace g3
