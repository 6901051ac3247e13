// bias_act.cpp: the elementwise steps around a biased linear layer: add the bias, add the bias and apply
// GELU (tanh approximation) in one pass over the MLP's hidden activations, or fold a projection's bias
// into the residual add.
#include <cmath>
#include "kernels.h"

namespace g3 {

static inline float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

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
    for (int i = 0; i < cols; ++i) p[i] = gelu_tanh(p[i] + bias[i]);
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
