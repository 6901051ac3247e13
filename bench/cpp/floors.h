// floors.h: the floors the CPU microbenchmarks report against, measured in the same run: copy
// bandwidth (memcpy of 512 MB, bytes read + written) for memory-bound kernels, and the FMA rate of all
// cores (12 independent 8-lane FMA chains per thread) for products. Shared by bench_kernels and
// bench_vision.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <vector>
#include <immintrin.h>
#include "cpu/common.h"

namespace floors {

inline double median_seconds(const std::function<void(int)>& fn, int reps) {
  fn(0);  // warm-up
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn(r);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

inline double measure_copy_bw() {
  const size_t n = (size_t)1 << 27;  // 512 MB of floats per side: far beyond L3
  std::vector<float> a(n, 1.f), b(n, 0.f);
  double t = median_seconds([&](int) { std::memcpy(b.data(), a.data(), n * 4); }, 5);
  return 2.0 * n * 4 / t;
}

inline double measure_fma_rate() {
  // 12 independent 8-lane FMA chains per thread, in registers: enough to cover the FMA latency, so
  // this is the arithmetic ceiling of the products.
  const long iters = 20000000;
  double t = median_seconds(
      [&](int) {
#pragma omp parallel
        {
#if defined(__AVX2__) && defined(__FMA__)
          // 12 chains in named registers; the empty asm makes them opaque, so nothing is folded away.
          __m256 a0 = _mm256_set1_ps(1.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
                 a9 = a0, a10 = a0, a11 = a0;
          const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
          for (long k = 0; k < iters / 96; ++k) {
            a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
            a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
            a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
            a9 = _mm256_fmadd_ps(a9, m, c); a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
            asm volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7),
                         "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
          }
          float sink[8];
          _mm256_storeu_ps(sink, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))));
          volatile float v = sink[0] + sink[7];
          (void)v;
#else
          float a[96];
          for (int i = 0; i < 96; ++i) a[i] = 1.f + i * 1e-6f;
          for (long k = 0; k < iters / 96; ++k)
            for (int i = 0; i < 96; ++i) a[i] = a[i] * 0.999999f + 1e-7f;
          volatile float v = a[0];
          (void)v;
#endif
        }
      },
      3);
  return 2.0 * iters * g3::num_threads() / t;
}

}  // namespace floors
