// attention.cpp: causal / sliding-window attention with GQA and optional soft-cap for one sequence's
// chunk of new queries, reading earlier keys from its KV cache (a ring buffer on local layers) and the
// chunk's own keys directly, so that a chunk longer than the window never reads an overwritten slot.
#include <algorithm>
#include <cmath>
#include "kernels.h"

namespace g3 {

void attention_cpu(float* out, int64_t out_stride, const float* q, int64_t q_stride, const float* k_new,
                   const float* v_new, int64_t kv_stride, const float* k_cache, const float* v_cache, int cap,
                   int start, int n, int heads, int kv_heads, int head_dim, int window, float scale,
                   float softcap, const int32_t* extent, float* scratch) {
  const int group = heads / kv_heads;
  const int D = head_dim;
  const int64_t scratch_per_thread = (int64_t)std::min(cap, start) + n;
#pragma omp parallel
  {
#ifdef _OPENMP
    float* sc = scratch + (int64_t)omp_get_thread_num() * scratch_per_thread;
#else
    float* sc = scratch;
#endif
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < heads; ++h) {
        const int p = start + i;
        const int hi = extent ? std::min(std::max(p, (int)extent[i]), start + n - 1) : p;
        const int g = h / group;
        const int jlo = window > 0 ? std::max(0, p - window + 1) : 0;
        const float* qv = q + (int64_t)i * q_stride + (int64_t)h * D;
        const float* kc = k_cache + (int64_t)g * cap * D;
        const float* vc = v_cache + (int64_t)g * cap * D;
        auto key = [&](int j) -> const float* {
          return j < start ? kc + (int64_t)(j % cap) * D : k_new + (int64_t)(j - start) * kv_stride + (int64_t)g * D;
        };
        auto val = [&](int j) -> const float* {
          return j < start ? vc + (int64_t)(j % cap) * D : v_new + (int64_t)(j - start) * kv_stride + (int64_t)g * D;
        };
        float mx = -INFINITY;
        for (int j = jlo; j <= hi; ++j) {
          const float* kv = key(j);
          float s = 0.f;
          for (int d = 0; d < D; ++d) s += qv[d] * kv[d];
          s *= scale;
          if (softcap > 0.f) s = std::tanh(s / softcap) * softcap;
          sc[j - jlo] = s;
          mx = std::max(mx, s);
        }
        float sum = 0.f;
        for (int j = jlo; j <= hi; ++j) {
          const float e = std::exp(sc[j - jlo] - mx);
          sc[j - jlo] = e;
          sum += e;
        }
        const float inv = 1.f / sum;
        float* o = out + (int64_t)i * out_stride + (int64_t)h * D;
        for (int d = 0; d < D; ++d) o[d] = 0.f;
        for (int j = jlo; j <= hi; ++j) {
          const float w = sc[j - jlo] * inv;
          const float* vv = val(j);
          for (int d = 0; d < D; ++d) o[d] += w * vv[d];
        }
      }
    }
  }
}

void kv_cache_write_cpu(float* k_cache, float* v_cache, const float* k_new, const float* v_new,
                        int64_t kv_stride, int cap, int start, int n, int kv_heads, int head_dim) {
  const int first = std::max(0, n - cap);  // earlier ones would be overwritten within this chunk anyway
  for (int i = first; i < n; ++i) {
    const int slot = (start + i) % cap;
    for (int g = 0; g < kv_heads; ++g) {
      std::copy_n(k_new + (int64_t)i * kv_stride + (int64_t)g * head_dim, head_dim,
                  k_cache + ((int64_t)g * cap + slot) * head_dim);
      std::copy_n(v_new + (int64_t)i * kv_stride + (int64_t)g * head_dim, head_dim,
                  v_cache + ((int64_t)g * cap + slot) * head_dim);
    }
  }
}

}  // namespace g3
