// bias_act.cpp: the elementwise steps around a biased linear layer: add the bias, add the bias and apply
// GELU (tanh approximation) in one pass over the MLP's hidden activations, or fold a projection's bias
// into the residual add. GELU is computed as x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi)(x + 0.044715 x^3),
// which equals 0.5 x (1 + tanh(u)); vectorised with vec_exp.h (scalar tanh dominated the MLP otherwise).
#include <cmath>
#include "kernels.h"
#include "vec_exp.h"

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
    int i = 0;
#ifdef G3_AVX2
    const __m256 k2 = _mm256_set1_ps(-2.f * 0.7978845608028654f), c = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.f);
    for (; i + 8 <= cols; i += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(p + i), _mm256_loadu_ps(bias + i));
      const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v);  // x + 0.044715 x^3
      const __m256 e = exp256(_mm256_mul_ps(k2, inner));                                 // exp(-2u)
      _mm256_storeu_ps(p + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
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
