// attention_full.cpp: non-causal multi-head attention (SigLIP: 16 heads of 72 over 4096 patches), every
// query seeing every key. Per head, K is gathered into a contiguous [n, D] matrix and V transposed to
// [D, n]; queries go in blocks of kBlock rows: S = Q K^T (matmul_cpu), row softmax of S * scale in place,
// O = S V (matmul_cpu against V^T). The score block bounds memory at kBlock x n floats.
#include <algorithm>
#include <cmath>
#include "kernels.h"

namespace g3 {

static constexpr int kBlock = 256;

size_t attention_full_scratch(int n, int head_dim) {
  const size_t bq = (size_t)std::min(n, kBlock);
  return 2 * (size_t)n * head_dim + 2 * bq * head_dim + bq * (size_t)n;
}

void attention_full_cpu(float* out, const float* q, const float* k, const float* v, int64_t stride, int n,
                        int heads, int head_dim, float scale, float* scratch) {
  const int D = head_dim;
  const int bq_max = std::min(n, kBlock);
  float* kh = scratch;                        // [n, D]
  float* vt = kh + (size_t)n * D;             // [D, n]
  float* qb = vt + (size_t)n * D;             // [bq, D]
  float* ob = qb + (size_t)bq_max * D;        // [bq, D]
  float* s = ob + (size_t)bq_max * D;         // [bq, n]
  const WeightView kv{kh, DType::F32, n, D};
  const WeightView vv{vt, DType::F32, D, n};
  for (int h = 0; h < heads; ++h) {
    const int64_t off = (int64_t)h * D;
#pragma omp parallel for schedule(static) if (n > 64)
    for (int j = 0; j < n; ++j) {
      std::copy_n(k + (int64_t)j * stride + off, D, kh + (int64_t)j * D);
      const float* vr = v + (int64_t)j * stride + off;
      for (int d = 0; d < D; ++d) vt[(int64_t)d * n + j] = vr[d];
    }
    for (int i0 = 0; i0 < n; i0 += kBlock) {
      const int bq = std::min(kBlock, n - i0);
      for (int i = 0; i < bq; ++i) std::copy_n(q + (int64_t)(i0 + i) * stride + off, D, qb + (int64_t)i * D);
      matmul_cpu(s, qb, kv, bq, D, n);
#pragma omp parallel for schedule(static) if (bq > 4)
      for (int i = 0; i < bq; ++i) {
        float* row = s + (int64_t)i * n;
        float mx = -INFINITY;
        for (int j = 0; j < n; ++j) mx = std::max(mx, row[j]);
        float sum = 0.f;
        for (int j = 0; j < n; ++j) {
          const float e = std::exp((row[j] - mx) * scale);
          row[j] = e;
          sum += e;
        }
        const float inv = 1.f / sum;
        for (int j = 0; j < n; ++j) row[j] *= inv;
      }
      matmul_cpu(ob, s, vv, bq, n, D);
      for (int i = 0; i < bq; ++i) std::copy_n(ob + (int64_t)i * D, D, out + (int64_t)(i0 + i) * heads * D + off);
    }
  }
}

}  // namespace g3
