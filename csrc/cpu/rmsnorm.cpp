// rmsnorm.cpp: Gemma RMSNorm (float32 statistics, (1 + w) weight) and QK-norm, which is the same
// normalisation applied to each head vector.
#include <cmath>
#include "kernels.h"

namespace g3 {

static inline void rmsnorm_row(float* o, const float* x, const float* w, int dim, float eps) {
  double ss = 0.0;  // double: the statistic is then exact to float32, whatever the order
  for (int i = 0; i < dim; ++i) ss += (double)x[i] * x[i];
  const float r = 1.f / std::sqrt((float)(ss / dim) + eps);
  for (int i = 0; i < dim; ++i) o[i] = (x[i] * r) * (1.f + w[i]);
}

void rmsnorm_cpu(float* out, int64_t out_stride, const float* x, int64_t x_stride, const float* w, int rows,
                 int dim, float eps) {
#pragma omp parallel for schedule(static) if (rows > 4)
  for (int r = 0; r < rows; ++r) rmsnorm_row(out + r * out_stride, x + r * x_stride, w, dim, eps);
}

void qk_norm_cpu(float* x, int64_t row_stride, const float* w, int rows, int heads, int head_dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * heads > 8)
  for (int i = 0; i < rows * heads; ++i) {
    float* p = x + (int64_t)(i / heads) * row_stride + (int64_t)(i % heads) * head_dim;
    rmsnorm_row(p, p, w, head_dim, eps);
  }
}

}  // namespace g3
