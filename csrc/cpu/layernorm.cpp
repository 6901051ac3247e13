// layernorm.cpp: LayerNorm with weight and bias (SigLIP's pre-norms and post-norm), as torch.nn.LayerNorm:
// biased variance, eps inside the square root. Mean and variance are taken in double (two passes), so the
// statistic is exact to float32 whatever the order of summation.
#include <cmath>
#include "kernels.h"

namespace g3 {

void layernorm_cpu(float* out, const float* x, const float* w, const float* b, int rows, int dim, float eps) {
#pragma omp parallel for schedule(static) if (rows > 4)
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (int64_t)r * dim;
    float* o = out + (int64_t)r * dim;
    double s = 0.0;
    for (int i = 0; i < dim; ++i) s += xr[i];
    const double mean = s / dim;
    double ss = 0.0;
    for (int i = 0; i < dim; ++i) {
      const double d = xr[i] - mean;
      ss += d * d;
    }
    const float m = (float)mean;
    const float rstd = (float)(1.0 / std::sqrt(ss / dim + (double)eps));
    for (int i = 0; i < dim; ++i) o[i] = (xr[i] - m) * rstd * w[i] + b[i];
  }
}

}  // namespace g3
