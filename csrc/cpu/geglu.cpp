// geglu.cpp: GeGLU with the tanh approximation of GELU, over stacked [gate | up] rows.
#include <cmath>
#include "kernels.h"

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
    for (int i = 0; i < F; ++i) o[i] = gelu_tanh(g[i]) * u[i];
  }
}

}  // namespace g3
