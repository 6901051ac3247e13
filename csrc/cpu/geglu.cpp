// geglu.cpp: GeGLU with the tanh approximation of GELU, over stacked [gate | up] rows. GELU as
// x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi)(x + 0.044715 x^3), which equals 0.5 x (1 + tanh(u)),
// with vec_exp.h's exp, as bias_act.cpp does for the vision MLP: a scalar tanh per element was most of the
// kernel's time (15 ns each: 0.6 ms of a 270M decode step, 6 % of a prefill).
#include <cmath>
#include "kernels.h"
#include "vec_exp.h"

namespace g3 {

static inline float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

void geglu_cpu(float* out, const float* gate_up, int rows, int F) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    const float* g = gate_up + (int64_t)r * 2 * F;
    const float* u = g + F;
    float* o = out + (int64_t)r * F;
    int i = 0;
#ifdef G3_AVX2
    const __m256 k2 = _mm256_set1_ps(-2.f * 0.7978845608028654f), c = _mm256_set1_ps(0.044715f),
                 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= F; i += 8) {
      const __m256 v = _mm256_loadu_ps(g + i);
      const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v);  // x + 0.044715 x^3
      const __m256 e = exp256(_mm256_mul_ps(k2, inner));                                 // exp(-2u)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < F; ++i) o[i] = gelu_tanh(g[i]) * u[i];
  }
}

}  // namespace g3
