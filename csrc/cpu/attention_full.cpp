// attention_full.cpp: non-causal multi-head attention (SigLIP: 16 heads of 72 over 4096 patches), every
// query seeing every key. K and V of every head are transposed first; then each (head, block of kBlock
// queries) is one task of a single parallel loop: S = Q K^T, row softmax of S * scale in place,
// O = S V (matmul_cpu against V^T, a long inner dimension).
// S is computed by its own kernel: with an inner dimension of only 72, matmul_cpu's per-output horizontal
// sums would dominate, so scores_block accumulates 4 queries x 16 keys in registers, walking d and
// broadcasting q (no horizontal sums). The score block bounds memory at kBlock x n floats.
#include <algorithm>
#include <cmath>
#include "kernels.h"
#include "vec_exp.h"

namespace g3 {

static constexpr int kBlock = 128;

// K^T in panels of 16 keys: kp[(j / 16) * D * 16 + d * 16 + j % 16] (zero past n), so that the score
// kernel walks d through contiguous memory (a plain [D, n] layout puts every d 4n bytes apart: one L1
// set for all of them).
static inline int64_t panel_index(int j, int d, int D) { return (int64_t)(j / 16) * D * 16 + (int64_t)d * 16 + (j % 16); }

// s[i, j] = sum_d qb[i, d] * K[j, d]   (qb [bq, D], K in panels, s [bq, n]); summed in order of d.
static void scores_block(float* s, const float* qb, const float* kp, int bq, int n, int D) {
  const int ib = (bq + 3) / 4, jb = (n + 15) / 16;
#pragma omp parallel for schedule(static) collapse(2) if (bq * n > 4096)
  for (int bi = 0; bi < ib; ++bi)
    for (int bj = 0; bj < jb; ++bj) {
      const int i0 = bi * 4, j0 = bj * 16;
      const int ni = std::min(4, bq - i0), nj = std::min(16, n - j0);
      const float* panel = kp + (int64_t)bj * D * 16;
#ifdef G3_AVX2
      if (ni == 4 && nj == 16) {
        __m256 acc[4][2];
        for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; ++d) {
          const __m256 k0 = _mm256_loadu_ps(panel + d * 16), k1 = _mm256_loadu_ps(panel + d * 16 + 8);
          for (int r = 0; r < 4; ++r) {
            const __m256 qv = _mm256_broadcast_ss(qb + (int64_t)(i0 + r) * D + d);
            acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
          }
        }
        for (int r = 0; r < 4; ++r) {
          _mm256_storeu_ps(s + (int64_t)(i0 + r) * n + j0, acc[r][0]);
          _mm256_storeu_ps(s + (int64_t)(i0 + r) * n + j0 + 8, acc[r][1]);
        }
        continue;
      }
#endif
      for (int r = 0; r < ni; ++r)
        for (int c = 0; c < nj; ++c) {
          float a = 0.f;
          for (int d = 0; d < D; ++d) a = std::fma(qb[(int64_t)(i0 + r) * D + d], panel[d * 16 + c], a);
          s[(int64_t)(i0 + r) * n + j0 + c] = a;
        }
    }
}

// In place: row = exp(row * scale - max(row * scale)) / sum, with the vectorised exp of vec_exp.h.
static void softmax_row(float* row, int n, float scale) {
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) mx = std::max(mx, row[j]);
  mx *= scale;  // scale > 0: the max of the scaled row
  int j = 0;
  float sum = 0.f;
#ifdef G3_AVX2
  __m256 vs = _mm256_setzero_ps();
  const __m256 vscale = _mm256_set1_ps(scale), vmx = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(row + j), vscale, vmx));
    _mm256_storeu_ps(row + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vs);
  sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
#endif
  for (; j < n; ++j) {
    const float e = std::exp(std::fma(row[j], scale, -mx));
    row[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
  for (j = 0; j < n; ++j) row[j] *= inv;
}

size_t attention_full_scratch(int n, int heads, int head_dim) {
  const size_t bq = (size_t)std::min(n, kBlock);
  const size_t per_head = (size_t)(n + 15) / 16 * 16 * head_dim + (size_t)n * head_dim;  // K panels, V^T
  const size_t per_thread = 2 * bq * head_dim + bq * (size_t)n;                          // Q, O, S blocks
  return (size_t)heads * per_head + (size_t)num_threads() * per_thread;
}

void attention_full_cpu(float* out, const float* q, const float* k, const float* v, int64_t stride, int n,
                        int heads, int head_dim, float scale, float* scratch) {
  const int D = head_dim;
  const int bq_max = std::min(n, kBlock);
  const size_t kp_size = (size_t)(n + 15) / 16 * 16 * D, vt_size = (size_t)n * D;
  float* kp_all = scratch;                                   // [heads] K^T in panels of 16 keys
  float* vt_all = kp_all + (size_t)heads * kp_size;          // [heads][D, n]
  float* per_thread = vt_all + (size_t)heads * vt_size;
  const size_t per_thread_size = 2 * (size_t)bq_max * D + (size_t)bq_max * n;
  // head by head (one head's panels and V^T stay in cache while they are written)
#pragma omp parallel for schedule(static) if (n > 64)
  for (int h = 0; h < heads; ++h) {
    float* kp = kp_all + h * kp_size;
    float* vt = vt_all + h * vt_size;
    for (int j = 0; j < n; ++j) {
      const float* kr = k + (int64_t)j * stride + (int64_t)h * D;
      const float* vr = v + (int64_t)j * stride + (int64_t)h * D;
      for (int d = 0; d < D; ++d) {
        kp[panel_index(j, d, D)] = kr[d];
        vt[(int64_t)d * n + j] = vr[d];
      }
    }
  }
  // One task per (head, block of queries); the kernels called inside run on the task's thread (their own
  // parallel loops are nested, hence inactive), so the whole attention is one parallel region.
  const int blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(dynamic, 1) if (heads * blocks > 1)
  for (int task = 0; task < heads * blocks; ++task) {
    const int h = task / blocks, i0 = (task % blocks) * kBlock;
    const int bq = std::min(kBlock, n - i0);
#ifdef _OPENMP
    float* qb = per_thread + (size_t)omp_get_thread_num() * per_thread_size;
#else
    float* qb = per_thread;
#endif
    float* ob = qb + (size_t)bq_max * D;
    float* s = ob + (size_t)bq_max * D;
    const int64_t off = (int64_t)h * D;
    for (int i = 0; i < bq; ++i) std::copy_n(q + (int64_t)(i0 + i) * stride + off, D, qb + (int64_t)i * D);
    scores_block(s, qb, kp_all + h * kp_size, bq, n, D);
    for (int i = 0; i < bq; ++i) softmax_row(s + (int64_t)i * n, n, scale);
    matmul_cpu(ob, s, WeightView{vt_all + h * vt_size, DType::F32, D, n}, bq, n, D);
    for (int i = 0; i < bq; ++i) std::copy_n(ob + (int64_t)i * D, D, out + (int64_t)(i0 + i) * heads * D + off);
  }
}

}  // namespace g3
