// residual_rmsnorm.cpp: the fused step between sub-blocks: optional post-norm of the sub-block output,
// residual add, and the next pre-norm, in one pass over the row.
#include <cmath>
#include "kernels.h"

namespace g3 {

void residual_rmsnorm_cpu(float* resid, float* out, const float* delta, const float* post_w,
                          const float* next_w, int rows, int dim, float eps) {
#pragma omp parallel for schedule(static) if (rows > 4)
  for (int r = 0; r < rows; ++r) {
    float* x = resid + (int64_t)r * dim;
    const float* d = delta + (int64_t)r * dim;
    if (post_w) {
      double ss = 0.0;
      for (int i = 0; i < dim; ++i) ss += (double)d[i] * d[i];
      const float rs = 1.f / std::sqrt((float)(ss / dim) + eps);
      for (int i = 0; i < dim; ++i) x[i] += (d[i] * rs) * (1.f + post_w[i]);
    } else {
      for (int i = 0; i < dim; ++i) x[i] += d[i];
    }
    double ss = 0.0;
    for (int i = 0; i < dim; ++i) ss += (double)x[i] * x[i];
    const float rs = 1.f / std::sqrt((float)(ss / dim) + eps);
    float* o = out + (int64_t)r * dim;
    for (int i = 0; i < dim; ++i) o[i] = (x[i] * rs) * (1.f + next_w[i]);
  }
}

}  // namespace g3
