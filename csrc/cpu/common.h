// common.h: small shared pieces of the CPU backend (bf16 conversion, dtypes, parallel helpers).
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace g3 {

enum class DType { F32, BF16 };

inline const char* dtype_name(DType d) { return d == DType::F32 ? "float32" : "bfloat16"; }
inline size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// A weight matrix (or vector) as stored: rows x cols, row-major, in its checkpoint dtype.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
};

inline float weight_at(const WeightView& w, int64_t i) {
  return w.dtype == DType::F32 ? ((const float*)w.data)[i] : bf16_to_f32(((const uint16_t*)w.data)[i]);
}

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace g3
