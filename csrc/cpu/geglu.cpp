// geglu.cpp: GeGLU with the tanh approximation of GELU (vec_exp.h's, as the vision MLP's bias_act.cpp), over
// stacked [gate | up] rows. A scalar tanh per element had been most of the kernel's time (15 ns each: 0.6 ms of
// a 270M decode step, 6 % of a prefill).
#include "kernels.h"
#include "vec_exp.h"

namespace g3 {

void geglu_cpu(float* out, const float* gate_up, int rows, int F) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    const float* g = gate_up + (int64_t)r * 2 * F;
    const float* u = g + F;
    float* o = out + (int64_t)r * F;
    int i = 0;
#ifdef G3_AVX2
    for (; i + 8 <= F; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu_tanh256(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
#endif
    for (; i < F; ++i) o[i] = gelu_tanh(g[i]) * u[i];
  }
}

}  // namespace g3
