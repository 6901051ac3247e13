// softcap.cpp: tanh soft-capping (Gemma 2 final logits; attention logits use it inside attention_cpu).
#include <cmath>
#include "kernels.h"

namespace g3 {

void softcap_cpu(float* x, int64_t n, float cap) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i] / cap) * cap;
}

}  // namespace g3
