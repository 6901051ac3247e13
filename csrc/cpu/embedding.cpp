// embedding.cpp: token embedding gather with Gemma's sqrt(hidden) scale.
#include <stdexcept>
#include "kernels.h"

namespace g3 {

void embedding_cpu(float* out, const WeightView& table, const int32_t* ids, int n, float scale) {
  const int64_t H = table.cols;
  for (int t = 0; t < n; ++t) {
    if (ids[t] < 0 || ids[t] >= table.rows)
      throw std::out_of_range("token id " + std::to_string(ids[t]) + " out of range [0, " +
                              std::to_string(table.rows) + ")");
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < n; ++t) {
    const int64_t base = (int64_t)ids[t] * H;
    float* o = out + (int64_t)t * H;
    if (table.dtype == DType::F32) {
      const float* r = (const float*)table.data + base;
      for (int64_t i = 0; i < H; ++i) o[i] = r[i] * scale;
    } else {
      const uint16_t* r = (const uint16_t*)table.data + base;
      for (int64_t i = 0; i < H; ++i) o[i] = bf16_to_f32(r[i]) * scale;
    }
  }
}

}  // namespace g3
