// bias_act.cpp: the elementwise steps around a biased linear layer: add the bias, add the bias and apply
// GELU (tanh approximation, vec_exp.h's gelu_tanh256) in one pass over the MLP's hidden activations, or fold a
// projection's bias into the residual add.
#include <cmath>
#include "kernels.h"
#include "vec_exp.h"

namespace g3 {

void bias_add_cpu(float* x, const float* bias, int rows, int cols) {
#pragma omp parallel for schedule(static) if (rows > 4)
  for (int r = 0; r < rows; ++r) {
    float* p = x + (int64_t)r * cols;
    for (int i = 0; i < cols; ++i) p[i] += bias[i];
  }
}

void bias_gelu_tanh_cpu(float* x, const float* bias, int rows, int cols) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    float* p = x + (int64_t)r * cols;
    int i = 0;
#ifdef G3_AVX2
    for (; i + 8 <= cols; i += 8)
      _mm256_storeu_ps(p + i, gelu_tanh256(_mm256_add_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(bias + i))));
#endif
    for (; i < cols; ++i) p[i] = gelu_tanh(p[i] + bias[i]);
  }
}

void bias_residual_add_cpu(float* resid, const float* delta, const float* bias, int rows, int cols) {
#pragma omp parallel for schedule(static) if (rows > 4)
  for (int r = 0; r < rows; ++r) {
    float* p = resid + (int64_t)r * cols;
    const float* d = delta + (int64_t)r * cols;
    for (int i = 0; i < cols; ++i) p[i] += d[i] + bias[i];
  }
}

}  // namespace g3
