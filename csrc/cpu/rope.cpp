// rope.cpp: rotary position embedding, rotate-half layout (pairs i and i + d/2), as transformers does:
// inv_freq = 1 / theta^(2i/d) in float32, divided by the linear factor, angle = pos * inv_freq in float32.
#include <cmath>
#include <vector>
#include "kernels.h"

namespace g3 {

std::vector<float> rope_inv_freq(int head_dim, float theta, float factor) {
  std::vector<float> inv(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    const float p = std::pow(theta, (float)(2 * i) / (float)head_dim);
    inv[i] = (1.f / p) / factor;
  }
  return inv;
}

void rope_cpu(float* x, int64_t row_stride, const int32_t* positions, int rows, int heads, int head_dim,
              float theta, float factor) {
  const int half = head_dim / 2;
  const std::vector<float> inv = rope_inv_freq(head_dim, theta, factor);
#pragma omp parallel if (rows > 2)
  {
    std::vector<float> c(half), s(half);
#pragma omp for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const float pos = (float)positions[r];
      for (int i = 0; i < half; ++i) {
        const float a = pos * inv[i];
        c[i] = (float)std::cos((double)a);
        s[i] = (float)std::sin((double)a);
      }
      for (int h = 0; h < heads; ++h) {
        float* v = x + (int64_t)r * row_stride + (int64_t)h * head_dim;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i] + a * s[i];
        }
      }
    }
  }
}

}  // namespace g3
