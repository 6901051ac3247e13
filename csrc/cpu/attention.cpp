// attention.cpp: causal / sliding-window attention with GQA and optional soft-cap for one sequence's
// chunk of new queries, reading earlier keys from its KV cache (a ring buffer on local layers) and the
// chunk's own keys directly, so that a chunk longer than the window never reads an overwritten slot.
// Each query row's visible keys are cut into blocks of kKeyBlock from the first; a block gives, for the
// query heads of one kv head at once (each key row is read once for all of them), its scores (dot8.h's
// order), their max m, sum l of exp(s - m) and the unnormalised sum o of exp(s - m) v; then the blocks
// combine in order (scaled to the largest m). A chunk of many queries runs its (query, kv head) pairs in
// parallel, a decode step (fewer pairs than threads) its blocks: the same block results and the same
// combination either way, so the bits do not depend on the thread count or on the batch.
#include <algorithm>
#include <cmath>
#include "dot8.h"
#include "kernels.h"
#include "vec_exp.h"

namespace g3 {

constexpr int kKeyBlock = 64;

static int key_blocks(int keys) { return (keys + kKeyBlock - 1) / kKeyBlock; }

size_t attention_cpu_scratch(int max_keys, int heads, int kv_heads, int head_dim) {
  const size_t G = (size_t)heads / std::max(1, kv_heads);
  const size_t per_thread = G * kKeyBlock + (size_t)key_blocks(max_keys) * G * (head_dim + 2);
  return (size_t)num_threads() * per_thread;
}

namespace {

// One (query row, kv head) of the chunk: where its keys are and which it sees.
struct Pair {
  const float* q;  // its G query heads, D floats apart
  const float* kc;
  const float* vc;
  const float* kn;  // the chunk's own keys / values of this kv head, rows of kv_stride floats
  const float* vn;
  int jlo, keys;  // visible keys jlo .. jlo + keys - 1
};

struct Shape {
  int G, D, cap, start;
  int64_t kv_stride;
  float scale, softcap;
};

inline const float* row_at(const float* cache, const float* fresh, const Shape& sh, int j) {
  return j < sh.start ? cache + (int64_t)(j % sh.cap) * sh.D : fresh + (int64_t)(j - sh.start) * sh.kv_stride;
}

// The scores of NK keys (from key t) for NH query heads (from head h) into sc[h * kKeyBlock + t]. With the
// first heads, the keys' value rows are prefetched: values() reads them across the block, a line of each row
// at a time, which the hardware prefetcher does not follow.
template <int NK, int NH>
inline void scores(float* sc, const float* const* krow, const float* const* vrow, const float* q, const Shape& sh,
                   int t, int h) {
#ifdef G3_AVX2
  if (h == 0)
    for (int a = 0; a < NK; ++a)
      for (int d = 0; d < sh.D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(vrow[t + a] + d), _MM_HINT_T0);
#endif
  const float* qs[NH];
  for (int i = 0; i < NH; ++i) qs[i] = q + (int64_t)(h + i) * sh.D;
  float s[NK][NH];
  dot8_tile<NK, NH>(krow + t, qs, sh.D, s);
  for (int a = 0; a < NK; ++a)
    for (int i = 0; i < NH; ++i) {
      float x = s[a][i] * sh.scale;
      if (sh.softcap > 0.f) x = std::tanh(x / sh.softcap) * sh.softcap;
      sc[(h + i) * kKeyBlock + t + a] = x;
    }
}

// o[h][d] = sum over the block's keys t, in order, of e[h][t] v_t[d], for NH heads (from h) at once: each
// value vector is loaded once for all of them and the sums stay in registers across the keys.
template <int NH>
inline void values(float* part, const float* sc, const float* const* vrow, int len, const Shape& sh, int h) {
  const int D = sh.D;
  int d = 0;
#ifdef G3_AVX2
  constexpr int NV = NH >= 4 ? 2 : 4 / NH;  // vectors of 8 along d per head: NH * NV accumulators
  for (; d + 8 * NV <= D; d += 8 * NV) {
    __m256 acc[NH][NV];
    for (int i = 0; i < NH; ++i)
      for (int c = 0; c < NV; ++c) acc[i][c] = _mm256_setzero_ps();
    for (int t = 0; t < len; ++t) {
      __m256 v[NV];
      for (int c = 0; c < NV; ++c) v[c] = _mm256_loadu_ps(vrow[t] + d + 8 * c);
      for (int i = 0; i < NH; ++i) {
        const __m256 e = _mm256_broadcast_ss(sc + (h + i) * kKeyBlock + t);
        for (int c = 0; c < NV; ++c) acc[i][c] = _mm256_fmadd_ps(e, v[c], acc[i][c]);
      }
    }
    for (int i = 0; i < NH; ++i)
      for (int c = 0; c < NV; ++c) _mm256_storeu_ps(part + (int64_t)(h + i) * (D + 2) + 2 + d + 8 * c, acc[i][c]);
  }
#endif
  for (; d < D; ++d)
    for (int i = 0; i < NH; ++i) {
      const float* e = sc + (h + i) * kKeyBlock;
      float o = 0.f;
      for (int t = 0; t < len; ++t) o = std::fma(e[t], vrow[t][d], o);  // as the vector path: one rounding a step
      part[(int64_t)(h + i) * (D + 2) + 2 + d] = o;
    }
}

// Block b of a pair: part[h * (D + 2) + {0, 1, 2..}] = m, l, o[D] for each of the G heads; sc: G * kKeyBlock
// floats.
void block_partial(float* part, float* sc, const Pair& pr, const Shape& sh, int b) {
  const int G = sh.G;
  const int j0 = pr.jlo + b * kKeyBlock, len = std::min(kKeyBlock, pr.keys - b * kKeyBlock);
  const float* krow[kKeyBlock];
  const float* vrow[kKeyBlock];
  for (int t = 0; t < len; ++t) {
    krow[t] = row_at(pr.kc, pr.kn, sh, j0 + t);
    vrow[t] = row_at(pr.vc, pr.vn, sh, j0 + t);
  }
  // scores: 4 accumulator chains where the heads allow (4 heads x 1 key, 2 x 2, 1 x 4)
  int h = 0;
  for (; h + 4 <= G; h += 4)
    for (int t = 0; t < len; ++t) scores<1, 4>(sc, krow, vrow, pr.q, sh, t, h);
  if (G - h >= 2) {
    int t = 0;
    for (; t + 2 <= len; t += 2) scores<2, 2>(sc, krow, vrow, pr.q, sh, t, h);
    for (; t < len; ++t) scores<1, 2>(sc, krow, vrow, pr.q, sh, t, h);
    h += 2;
  }
  if (G - h == 1) {
    int t = 0;
    for (; t + 4 <= len; t += 4) scores<4, 1>(sc, krow, vrow, pr.q, sh, t, h);
    for (; t < len; ++t) scores<1, 1>(sc, krow, vrow, pr.q, sh, t, h);
  }
  for (h = 0; h < G; ++h) {
    float* s = sc + h * kKeyBlock;
    float* p = part + (int64_t)h * (sh.D + 2);
    float m = -INFINITY;
    for (int t = 0; t < len; ++t) m = std::max(m, s[t]);
    int t = 0;
#ifdef G3_AVX2
    const __m256 vm = _mm256_set1_ps(m);
    for (; t + 8 <= len; t += 8) _mm256_storeu_ps(s + t, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm)));
#endif
    for (; t < len; ++t) s[t] = std::exp(s[t] - m);
    float l = 0.f;
    for (t = 0; t < len; ++t) l += s[t];
    p[0] = m;
    p[1] = l;
  }
  for (h = 0; h + 4 <= G; h += 4) values<4>(part, sc, vrow, len, sh, h);
  if (G - h >= 2) {
    values<2>(part, sc, vrow, len, sh, h);
    h += 2;
  }
  if (G - h == 1) values<1>(part, sc, vrow, len, sh, h);
}

// Head h of a pair from its nb block results (block b at part + b * G * (D + 2)).
void combine(float* out, const float* part, const Shape& sh, int nb, int h) {
  const int64_t bs = (int64_t)sh.G * (sh.D + 2);
  const float* p0 = part + (int64_t)h * (sh.D + 2);
  float m = -INFINITY;
  for (int b = 0; b < nb; ++b) m = std::max(m, p0[b * bs]);
  float l = 0.f;
  for (int d = 0; d < sh.D; ++d) out[d] = 0.f;
  for (int b = 0; b < nb; ++b) {
    const float* p = p0 + b * bs;
    const float f = std::exp(p[0] - m);
    l += p[1] * f;
    for (int d = 0; d < sh.D; ++d) out[d] += p[2 + d] * f;
  }
  const float inv = 1.f / l;
  for (int d = 0; d < sh.D; ++d) out[d] *= inv;
}

}  // namespace

void attention_cpu(float* out, int64_t out_stride, const float* q, int64_t q_stride, const float* k_new,
                   const float* v_new, int64_t kv_stride, const float* k_cache, const float* v_cache, int cap,
                   int start, int n, int heads, int kv_heads, int head_dim, int window, float scale,
                   float softcap, const int32_t* extent, float* scratch) {
  const int G = heads / kv_heads, D = head_dim;
  const Shape sh{G, D, cap, start, kv_stride, scale, softcap};
  auto pair = [&](int i, int g) {
    const int p = start + i;
    const int hi = extent ? std::min(std::max(p, (int)extent[i]), start + n - 1) : p;
    const int jlo = window > 0 ? std::max(0, p - window + 1) : 0;
    return Pair{q + (int64_t)i * q_stride + (int64_t)g * G * D, k_cache + (int64_t)g * cap * D,
                v_cache + (int64_t)g * cap * D, k_new + (int64_t)g * D, v_new + (int64_t)g * D, jlo, hi - jlo + 1};
  };
  // scratch: every thread's scores, then every thread's block results (key_blocks(max keys) of them)
  const int threads = num_threads();
  const int max_keys = std::min(cap, start) + n;
  const int64_t part_per_thread = (int64_t)key_blocks(max_keys) * G * (D + 2);
  float* parts = scratch + (int64_t)threads * G * kKeyBlock;
  const int npairs = n * kv_heads;
  if (npairs >= threads) {
#pragma omp parallel
    {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      float* sc = scratch + (int64_t)tid * G * kKeyBlock;
      float* part = parts + tid * part_per_thread;
#pragma omp for schedule(dynamic, 1)
      for (int pi = 0; pi < npairs; ++pi) {
        const int i = pi / kv_heads, g = pi % kv_heads;
        const Pair pr = pair(i, g);
        const int nb = key_blocks(pr.keys);
        for (int b = 0; b < nb; ++b) block_partial(part + b * (int64_t)G * (D + 2), sc, pr, sh, b);
        for (int h = 0; h < G; ++h)
          combine(out + (int64_t)i * out_stride + (int64_t)(g * G + h) * D, part, sh, nb, h);
      }
    }
  } else {  // a decode step: the blocks of each pair in parallel, into the first thread's results
    for (int pi = 0; pi < npairs; ++pi) {
      const int i = pi / kv_heads, g = pi % kv_heads;
      const Pair pr = pair(i, g);
      const int nb = key_blocks(pr.keys);
#pragma omp parallel if (nb > 1)
      {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
        for (int b = 0; b < nb; ++b)
          block_partial(parts + b * (int64_t)G * (D + 2), scratch + (int64_t)tid * G * kKeyBlock, pr, sh, b);
      }
      for (int h = 0; h < G; ++h) combine(out + (int64_t)i * out_stride + (int64_t)(g * G + h) * D, parts, sh, nb, h);
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
