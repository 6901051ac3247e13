// sampling.cu: next-token choice on the GPU so that only ids come back; no host sync, no allocation
// (the caller's workspace), graph-capturable. temperature <= 0: argmax (first maximum; with a
// workspace, a many-block first pass). Otherwise the CPU sampler's algorithm (csrc/cpu/sampling.cpp):
// candidates in the order (logit desc, id asc), the top k of them, weights exp((l - max) / temperature)
// in double, the top-p cut (the shortest prefix whose mass >= top_p), and the uniform draw u * kept
// from the same counter-based hash (splitmix64) of (seed, counter). Two paths:
//  - at most kSampleMaxK candidates of at most kSampleNarrowMaxV logits: one block of 1024 threads per
//    row: a 4-pass radix select of the k-th largest key, a bitonic sort, and the sums taken
//    sequentially in the CPU's order (bit-exact).
//  - wider rows (top_k 0 or > kSampleMaxK, e.g. the whole 262144-token vocabulary) and every sampled row
//    of a vocabulary above kSampleNarrowMaxV (one block per row is too slow there): no sort. Each
//    question "which position of the sorted order is the first whose running weight exceeds X" is a
//    radix search over the 32-bit order-preserving keys, three digits (11, 11, 10 bits), one launch
//    per digit over many blocks per row: per-block shared histograms of (count, mass) over the keys
//    that match the prefix so far, summed into a per-row global histogram, and the row's last block
//    to finish picks the digit. Searches, in turn: the top-k boundary (by count, when k < V), the
//    top-p boundary (by mass, target top_p * mass of the top k), the draw (by mass, target u * kept).
//    Equal keys are equal logits, so a run of ties has one weight: the rank inside it is arithmetic,
//    and for the draw the id is found from the per-block counts of the last digit (blocks cover
//    ascending id ranges). The first digit's histogram (the whole row) is kept and reused by each
//    later search, so a row needs 1 + 2 * searches launches. Masses are fixed point: round(p * 2^s),
//    s = 63 - ceil(log2 V), so the sums are exact integers (deterministic whatever the atomics' order,
//    no overflow: V * 2^s <= 2^63) and within V * 2^-(s+1) of the exact sum (p <= 1, the maximum has
//    p = 1): the id equals the CPU's unless u * kept or top_p * sum lies that close to a boundary.
#include <algorithm>
#include <cmath>
#include "kernels.cuh"

namespace g3cuda {

constexpr int kST = 1024;  // threads of the one-block-per-row kernel
constexpr int kPT = 256;   // threads of the wide-row pass kernels
constexpr int kBins = 2048;

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ double uniform_from(uint64_t seed, uint64_t counter) {
  const uint64_t h = splitmix64(splitmix64(seed) ^ (counter * 0xd1b54a32d192ed03ull));
  return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}
// larger float -> larger key; -0 and +0 equal (they compare equal on the CPU)
__device__ __forceinline__ uint32_t fkey(float f) {
  if (f == 0.f) f = 0.f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}
__device__ __forceinline__ int row_k(int top_k, int V) { return (top_k > 0 && top_k < V) ? top_k : V; }
__device__ __forceinline__ bool wide_row(float temp, int top_k, int V) {  // = sample_is_wide()
  return temp > 0.f && (row_k(top_k, V) > kSampleMaxK || V > kSampleNarrowMaxV);
}

// Greedy and wide rows, first pass: blocks over the row, each folds (key(value), ~index) into one
// 64-bit atomicMax per block, so the maximum with the lowest index wins (the CPU's first maximum).
__global__ void argmax_partial_kernel(unsigned long long* best, const float* logits, int V, const float* temperature,
                                      const int32_t* top_k) {
  G3_TRACE_SCOPE();
  const int b = blockIdx.y;
  // the row's settings are metadata (no kernel of the step writes them): read ahead of the wait, so that
  // after it only the logits are a round trip
  const float temp = temperature[b];
  const int tk = top_k[b];
  G3_PDL_WAIT();
  G3_PDL_LAUNCH();
  __shared__ unsigned long long sh[32];
  if (temp > 0.f && !wide_row(temp, tk, V)) return;
  const float* L = logits + (int64_t)b * V;
  const int per = (V + gridDim.x - 1) / gridDim.x;
  const int lo = blockIdx.x * per, hi = min(V, lo + per);
  unsigned long long m = 0;
#pragma unroll 4
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const unsigned long long k = ((unsigned long long)fkey(L[i]) << 32) | (0xffffffffu - (uint32_t)i);
    m = k > m ? k : m;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long v = __shfl_xor_sync(0xffffffffu, m, o);
    m = v > m ? v : m;
  }
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = sh[w] > m ? sh[w] : m;
    atomicMax(&best[b], m);
  }
}

// ---- wide rows ----

struct SampleRow {                 // a row's search state between launches (zero when idle)
  unsigned long long target;       // the search: first position whose running weight exceeds target
  unsigned long long above;        // weight (count for the top-k search, else mass) of keys above the prefix
  unsigned long long above_mass;   // mass of keys above the prefix
  unsigned long long kept;         // mass of the candidates: the whole row, then the top k, then the nucleus
  uint32_t prefix;                 // key bits chosen so far
  int stage;                       // 0 idle, 1 top-k boundary, 2 top-p boundary, 3 draw
  int digit;                       // the digit the next launch histograms (1 or 2)
  unsigned arrived;                // blocks of the current launch that are done
};

struct SampleWs {
  unsigned long long* best;  // [R] argmax partials
  SampleRow* row;            // [R]
  unsigned* h1c;             // [R][kBins] first-digit histogram of the whole row: counts
  unsigned long long* h1m;   //                                                  masses
  unsigned* hc;              // [R][kBins] histogram of the current launch
  unsigned long long* hm;
  unsigned* tie;             // [B][G][1024] per-block counts of the draw's last digit (scratch)
};

static size_t align256(size_t x) { return (x + 255) / 256 * 256; }
static size_t zeroed_bytes(int R) {
  return align256((size_t)R * 8) + align256((size_t)R * sizeof(SampleRow)) + 2 * align256((size_t)R * kBins * 4) +
         2 * align256((size_t)R * kBins * 8);
}
static SampleWs carve(void* ws, int R) {
  char* p = static_cast<char*>(ws);
  SampleWs w;
  auto take = [&](size_t bytes) { char* at = p; p += align256(bytes); return at; };
  w.best = reinterpret_cast<unsigned long long*>(take((size_t)R * 8));
  w.row = reinterpret_cast<SampleRow*>(take((size_t)R * sizeof(SampleRow)));
  w.h1c = reinterpret_cast<unsigned*>(take((size_t)R * kBins * 4));
  w.h1m = reinterpret_cast<unsigned long long*>(take((size_t)R * kBins * 8));
  w.hc = reinterpret_cast<unsigned*>(take((size_t)R * kBins * 4));
  w.hm = reinterpret_cast<unsigned long long*>(take((size_t)R * kBins * 8));
  w.tie = reinterpret_cast<unsigned*>(p);
  return w;
}
// Blocks per wide row: ~256 blocks in all (2 per SM), at least 1024 elements each.
static int wide_blocks(int B, int V) {
  return std::max(1, std::min(std::min(128, std::max(4, 256 / B)), (V + 1023) / 1024));
}

size_t sample_workspace_zeroed_bytes(int rows) { return zeroed_bytes(rows); }
size_t sample_workspace_bytes(int rows, int V) {
  size_t tie = 0;
  for (int B = 1; B <= rows; ++B) tie = std::max(tie, (size_t)B * wide_blocks(B, V) * 1024 * 4);
  return zeroed_bytes(rows) + tie;
}

__device__ __forceinline__ unsigned long long qmass(float l, double mx, float temp, double scale) {
  return __double2ull_rn(exp(((double)l - mx) / (double)temp) * scale);
}

// Warp 0: scanning the bins from the highest down, the first bin d whose running weight (from
// `above`) exceeds T; above / above_m advance over the bins above d. Weight = count or mass. Narrowed
// in levels (2048 bins: lanes over 64-bin spans, then over 2-bin spans, then single bins), each a
// suffix scan over the lanes and a ballot, so no lane walks more than 64 bins.
__device__ int select_bin(const unsigned* c, const unsigned long long* m, int nb, bool by_count,
                          unsigned long long T, unsigned long long& above, unsigned long long& above_m) {
  const int lane = threadIdx.x & 31;
  unsigned long long aw = above, am = above_m;
  int lo = 0, span = nb;
  for (;;) {
    const int per = (span + 31) / 32;
    const int a = min(lo + lane * per, lo + span), e = min(a + per, lo + span);
    unsigned long long ow = 0, om = 0;
    for (int i = a; i < e; ++i) {
      ow += by_count ? (unsigned long long)c[i] : m[i];
      om += m[i];
    }
    unsigned long long sw = ow, sm = om;  // inclusive suffix sums: this lane's bins and all higher ones
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long vw = __shfl_down_sync(0xffffffffu, sw, o), vm = __shfl_down_sync(0xffffffffu, sm, o);
      if (lane + o < 32) { sw += vw; sm += vm; }
    }
    const unsigned bal = __ballot_sync(0xffffffffu, aw + (sw - ow) <= T && aw + sw > T);
    const int src = bal ? __ffs(bal) - 1 : 0;  // none only for NaN logits: any bin, the id falls back to argmax
    aw += __shfl_sync(0xffffffffu, sw - ow, src);
    am += __shfl_sync(0xffffffffu, sm - om, src);
    const int na = __shfl_sync(0xffffffffu, a, src), ne = __shfl_sync(0xffffffffu, e, src);
    if (per == 1 || ne - na <= 1) {
      above = aw;
      above_m = am;
      return na;
    }
    lo = na;
    span = ne - na;
  }
}

// One digit of the current search of every wide row: grid (G, B). first: the launch that builds
// the whole-row histogram and starts each row's first search.
__global__ void __launch_bounds__(kPT) wide_pass_kernel(int32_t* ids, const float* logits, int V, double scale,
                                                        const float* temperature, const int32_t* top_k,
                                                        const float* top_p, const uint64_t* seed,
                                                        const uint64_t* counter, SampleWs w, int first) {
  G3_PDL_ENTRY();
  __shared__ unsigned c[kBins];
  __shared__ unsigned long long m[kBins];
  __shared__ SampleRow s;
  __shared__ unsigned wc[kPT / 32];
  __shared__ int s_last, s_action, s_blk;
  __shared__ unsigned s_rank;
  const int b = blockIdx.y, blk = blockIdx.x, G = gridDim.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float temp = temperature[b];
  const int k = row_k(top_k[b], V);
  if (!wide_row(temp, top_k[b], V)) return;
  SampleRow* st = w.row + b;
  const int stage = first ? 0 : st->stage;
  if (!first && stage == 0) return;  // this row finished in an earlier launch
  const int digit = first ? 0 : st->digit;
  const uint32_t prefix = first ? 0u : st->prefix;
  const int shift = digit == 0 ? 21 : digit == 1 ? 10 : 0;
  const int nb = digit == 2 ? 1024 : 2048;
  const uint32_t hi_mask = digit == 0 ? 0u : digit == 1 ? 0xffe00000u : 0xfffffc00u;
  const double mx = key_float((uint32_t)(w.best[b] >> 32));
  const float* L = logits + (int64_t)b * V;
  const int per = (V + G - 1) / G;

  // The block's histogram: masses as two 32-bit halves with the carry taken by the add that wraps
  // (32-bit shared atomics are native; 64-bit ones may be compare-and-swap loops).
  unsigned* mlo = reinterpret_cast<unsigned*>(m);
  unsigned* mhi = mlo + kBins;
  for (int i = tid; i < kBins; i += kPT) { c[i] = 0; m[i] = 0; }
  __syncthreads();
  {
    const int lo = blk * per, hi = min(V, lo + per);
    for (int i = lo + tid; i < hi; i += kPT) {
      const float l = L[i];
      const uint32_t key = fkey(l);
      if ((key & hi_mask) != prefix) continue;
      const int bin = (key >> shift) & (nb - 1);
      atomicAdd(&c[bin], 1u);
      const unsigned long long q = qmass(l, mx, temp, scale);
      const unsigned ql = (unsigned)q;
      unsigned qh = (unsigned)(q >> 32);
      if (ql && atomicAdd(&mlo[bin], ql) + ql < ql) ++qh;
      if (qh) atomicAdd(&mhi[bin], qh);
    }
  }
  __syncthreads();
  if (stage == 3 && digit == 2)
    for (int i = tid; i < 1024; i += kPT) w.tie[((size_t)b * G + blk) * 1024 + i] = c[i];
  unsigned* gc = (digit == 0 ? w.h1c : w.hc) + (size_t)b * kBins;
  unsigned long long* gm = (digit == 0 ? w.h1m : w.hm) + (size_t)b * kBins;
  for (int i = tid; i < nb; i += kPT) {
    const unsigned long long mv = ((unsigned long long)mhi[i] << 32) + mlo[i];
    if (c[i]) atomicAdd(&gc[i], c[i]);
    if (mv) atomicAdd(&gm[i], mv);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&st->arrived, 1u) == (unsigned)G - 1;
  __syncthreads();
  if (!s_last) return;

  // The row's last block: the row's histogram of this digit.
  __threadfence();
  for (int i = tid; i < nb; i += kPT) {
    c[i] = __ldcg(gc + i);
    m[i] = __ldcg(gm + i);
    if (digit > 0) { gc[i] = 0; gm[i] = 0; }  // ready for the next launch
  }
  if (tid == 0) {
    if (first) s = SampleRow{};
    else s = *st;
    s.arrived = 0;
  }
  __syncthreads();
  const float tp = top_p[b];
  const bool use_p = tp > 0.f && tp < 1.f;
  // Warp 0 decides on a copy r of the state. action: 0 next digit, 1 start the next search (from
  // the whole-row histogram), 2 the draw is decided.
  if (warp == 0) {
    SampleRow r = s;
    int action = 0;
    if (first) {
      unsigned long long S = 0;
      for (int i = lane; i < kBins; i += 32) S += m[i];
      for (int o = 16; o > 0; o >>= 1) S += __shfl_xor_sync(0xffffffffu, S, o);
      r.kept = S;
      action = 1;
    } else {
      const int d = select_bin(c, m, nb, stage == 1, r.target, r.above, r.above_mass);
      r.prefix = prefix | ((uint32_t)d << shift);
      if (digit < 2) {
        r.digit = digit + 1;
      } else {
        // key decided: a run of equal logits, each of mass q, ordered by id
        const unsigned long long q = qmass(key_float(r.prefix), mx, temp, scale);
        if (stage == 1) {
          r.kept = r.above_mass + (r.target - r.above + 1) * q;  // the top k take r.target - r.above + 1 of the run
          action = 1;
        } else {
          const unsigned long long rank = q ? (r.target - r.above) / q : 0;
          if (stage == 2) {
            r.kept = r.above + (rank + 1) * q;
            action = 1;
          } else {
            r.target = rank;  // the draw: the rank-th (from 0) id whose key is r.prefix
            action = 2;
          }
        }
      }
    }
    __syncwarp();  // every lane has read s (its copy r) before lane 0 overwrites it
    if (lane == 0) {
      s = r;
      s_action = action;
    }
  }
  __syncthreads();
  const int action = s_action;
  if (action == 1) {
    if (!first) {
      for (int i = tid; i < kBins; i += kPT) {
        c[i] = __ldcg(w.h1c + (size_t)b * kBins + i);
        m[i] = __ldcg(w.h1m + (size_t)b * kBins + i);
      }
      __syncthreads();
    }
    if (warp == 0) {
      SampleRow r = s;
      const int next = (stage < 1 && k < V) ? 1 : (stage < 2 && use_p) ? 2 : 3;
      unsigned long long T;
      if (next == 1) {
        T = (unsigned long long)(k - 1);  // position k - 1
      } else if (next == 2) {
        T = (unsigned long long)ceil((double)tp * (double)r.kept) - 1;  // running mass >= top_p * kept
      } else {
        const double x = uniform_from(seed[b], counter[b]) * (double)r.kept;  // running mass > u * kept
        T = min((unsigned long long)x, r.kept - 1);
      }
      r.stage = next;
      r.target = T;
      r.above = r.above_mass = 0;
      r.prefix = (uint32_t)select_bin(c, m, kBins, next == 1, T, r.above, r.above_mass) << 21;
      r.digit = 1;
      __syncwarp();  // as above: all lanes have read s
      if (lane == 0) s = r;
    }
    __syncthreads();
  }
  if (action != 2) {
    if (tid == 0) *st = s;
    return;
  }

  // The draw: which block holds the s.target-th element of key s.prefix, and its rank there.
  const uint32_t t = s.prefix;
  if (warp == 0) {
    unsigned before = 0;
    int found = -1;
    unsigned rank = 0;
    for (int base = 0; base < G && found < 0; base += 32) {
      const unsigned n = base + lane < G ? __ldcg(w.tie + ((size_t)b * G + base + lane) * 1024 + (t & 1023u)) : 0u;
      unsigned incl = n;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const bool mine = before + incl - n <= s.target && before + incl > s.target;
      const unsigned bal = __ballot_sync(0xffffffffu, mine);
      if (bal) {
        const int src = __ffs(bal) - 1;
        found = base + src;
        rank = (unsigned)s.target - __shfl_sync(0xffffffffu, before + incl - n, src);
      }
      before += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      s_blk = found;
      s_rank = rank;
      ids[b] = (int32_t)(0xffffffffu - (uint32_t)(w.best[b] & 0xffffffffu));  // replaced below (NaN rows: argmax)
    }
  }
  __syncthreads();
  if (s_blk >= 0) {
    const int lo = s_blk * per, hi = min(V, lo + per);
    unsigned seen = 0;
    const unsigned want = s_rank;
    for (int base = lo; base < hi && seen <= want; base += kPT) {
      const int i = base + tid;
      const bool f = i < hi && fkey(L[i]) == t;
      const unsigned bal = __ballot_sync(0xffffffffu, f);
      if (lane == 0) wc[warp] = __popc(bal);
      __syncthreads();
      unsigned off = 0, tot = 0;
      for (int x = 0; x < kPT / 32; ++x) {
        off += x < warp ? wc[x] : 0u;
        tot += wc[x];
      }
      if (f && seen + off + __popc(bal & ((1u << lane) - 1u)) == want) ids[b] = i;
      seen += tot;
      __syncthreads();
    }
  }
  // idle again: the whole-row histogram and the state back to zero
  for (int i = tid; i < kBins; i += kPT) {
    w.h1c[(size_t)b * kBins + i] = 0;
    w.h1m[(size_t)b * kBins + i] = 0;
  }
  if (tid == 0) *st = SampleRow{};
}

// ---- rows of at most kSampleMaxK candidates (and the greedy rows) ----

__global__ void __launch_bounds__(kST) sample_kernel(int32_t* ids, const float* logits, int V, const float* temperature,
                                                     const int32_t* top_k, const float* top_p, const uint64_t* seed,
                                                     const uint64_t* counter, unsigned long long* best) {
  G3_TRACE_SCOPE();
  const float temp = temperature[blockIdx.x];  // metadata, ahead of the wait (argmax_partial_kernel)
  G3_PDL_WAIT();
  G3_PDL_LAUNCH();
  __shared__ float cv[kST];
  __shared__ int ci[kST];
  __shared__ double pw[kST];
  __shared__ unsigned hist[256];
  __shared__ unsigned wcnt[33];
  __shared__ unsigned s_prefix, s_rem, s_n;
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* L = logits + (int64_t)b * V;
  if (!(temp > 0.f) && best) {
    if (tid == 0) {
      ids[b] = (int32_t)(0xffffffffu - (uint32_t)(best[b] & 0xffffffffu));
      best[b] = 0;  // ready for the next launch (graph replays)
    }
    return;
  }
  if (!(temp > 0.f)) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = tid; i < V; i += kST)
      if (bi == 0x7fffffff || L[i] > bv) { bv = L[i]; bi = i; }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != 0x7fffffff && (bi == 0x7fffffff || before(ov, oi, bv, bi))) { bv = ov; bi = oi; }
    }
    if (lane == 0) { cv[warp] = bv; ci[warp] = bi; }
    __syncthreads();
    if (tid == 0) {
      float v = cv[0];
      int i0 = ci[0];
      for (int w = 1; w < kST / 32; ++w)
        if (ci[w] != 0x7fffffff && (i0 == 0x7fffffff || before(cv[w], ci[w], v, i0))) { v = cv[w]; i0 = ci[w]; }
      ids[b] = i0;
    }
    return;
  }
  const int k = row_k(top_k[b], V);
  if (wide_row(temp, top_k[b], V)) {  // a wide row: the id is already there (wide_pass_kernel)
    if (tid == 0 && best) best[b] = 0;
    return;
  }
  // radix select: the k-th largest key
  uint32_t prefix = 0, rem = k;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t hi_mask = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
    for (int i = tid; i < 256; i += kST) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < V; i += kST) {
      const uint32_t key = fkey(L[i]);
      if ((key & hi_mask) == (prefix & hi_mask)) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t cum = 0;
      for (int d = 255; d >= 0; --d) {
        if (cum + hist[d] >= rem) {
          s_prefix = prefix | ((uint32_t)d << shift);
          s_rem = rem - cum;
          break;
        }
        cum += hist[d];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    rem = s_rem;
  }
  // candidates: every key above the k-th, then the `rem` lowest ids equal to it
  if (tid == 0) s_n = 0;
  cv[tid] = -INFINITY;
  ci[tid] = 0x7fffffff;
  __syncthreads();
  for (int i = tid; i < V; i += kST)
    if (fkey(L[i]) > prefix) {
      const unsigned p = atomicAdd(&s_n, 1u);
      cv[p] = L[i];
      ci[p] = i;
    }
  __syncthreads();
  const unsigned greater = s_n;  // == k - rem
  unsigned taken = 0;
  for (int base = 0; base < V && taken < rem; base += kST) {
    const int i = base + tid;
    const bool f = i < V && fkey(L[i]) == prefix;
    const unsigned bal = __ballot_sync(0xffffffffu, f);
    if (lane == 0) wcnt[warp] = __popc(bal);
    __syncthreads();
    if (tid == 0) {
      unsigned acc = 0;
      for (int w = 0; w < kST / 32; ++w) { const unsigned c = wcnt[w]; wcnt[w] = acc; acc += c; }
      wcnt[32] = acc;
    }
    __syncthreads();
    const unsigned rank = taken + wcnt[warp] + __popc(bal & ((1u << lane) - 1u));
    if (f && rank < rem) {
      cv[greater + rank] = L[i];
      ci[greater + rank] = i;
    }
    taken += wcnt[32];
    __syncthreads();
  }
  // bitonic sort of kST entries by (value desc, id asc); padding (-inf, INT_MAX) goes last
  for (int size = 2; size <= kST; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const int j = tid ^ stride;
      if (j > tid) {
        const bool up = (tid & size) == 0;
        const float va = cv[tid], vb = cv[j];
        const int ia = ci[tid], ib = ci[j];
        const bool swap = up ? before(vb, ib, va, ia) : before(va, ia, vb, ib);
        if (swap) { cv[tid] = vb; cv[j] = va; ci[tid] = ib; ci[j] = ia; }
      }
      __syncthreads();
    }
  }
  const double mx = cv[0];
  if (tid < k) pw[tid] = exp(((double)cv[tid] - mx) / (double)temp);
  __syncthreads();
  if (tid == 0) {
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += pw[i];
    int keep = k;
    const float tp = top_p[b];
    if (tp > 0.f && tp < 1.f) {
      double c = 0.0;
      for (int i = 0; i < k; ++i) {
        c += pw[i] / sum;
        if (c >= tp) { keep = i + 1; break; }
      }
    }
    double kept = 0.0;
    for (int i = 0; i < keep; ++i) kept += pw[i];
    const double u = uniform_from(seed[b], counter[b]) * kept;
    double c = 0.0;
    int pick = ci[keep - 1];
    for (int i = 0; i < keep; ++i) {
      c += pw[i];
      if (u < c) { pick = ci[i]; break; }
    }
    ids[b] = pick;
  }
}

void sample(int32_t* ids, const float* logits, int B, int V, const float* temperature, const int32_t* top_k,
            const float* top_p, const uint64_t* seed, const uint64_t* counter, void* ws, int ws_rows, int searches,
            cudaStream_t s) {
  if (B <= 0) return;
  if (searches > 0 && (!ws || ws_rows < B)) throw std::invalid_argument("sample: wide rows need a workspace of B rows");
  SampleWs w{};
  if (ws) w = carve(ws, ws_rows);
  if (ws) {
    const int blocks = std::max(1, std::min(512, V / 1024));  // ~4 loads per thread
    launch_k(argmax_partial_kernel, dim3(blocks, B), 256, 0, s, w.best, logits, V, temperature, top_k);
    CUDA_LAUNCH_CHECK();
  }
  if (searches > 0) {
    const int G = wide_blocks(B, V);
    int lg = 0;
    while ((1 << lg) < V) ++lg;  // ceil(log2 V)
    const double scale = std::ldexp(1.0, 63 - lg);
    for (int i = 0; i < 1 + 2 * std::min(searches, 3); ++i) {
      launch_k(wide_pass_kernel, dim3(G, B), kPT, 0, s, ids, logits, V, scale, temperature, top_k, top_p, seed, counter,
               w, i == 0 ? 1 : 0);
      CUDA_LAUNCH_CHECK();
    }
  }
  launch_k(sample_kernel, B, kST, 0, s, ids, logits, V, temperature, top_k, top_p, seed, counter,
           ws ? w.best : nullptr);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
