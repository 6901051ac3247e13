// attention_decode_tc.cuh: one block's work of the tensor-core decode attention (the kernel and its
// design: attention_decode_tc.cu), as a device function shared by that kernel and by the persistent
// decode kernel (decode_persistent.cu), which runs it on 4 of its warps. The caller gives the 128
// threads' barrier (`sync`), the shared memory (decode_tc_smem_bytes) and prep(Qs, LD, Kp, Vp, has_p),
// called once the block's first tiles' copies are issued: it writes the query heads of the kv head as
// rows 0..G-1 of Qs (rows G..15 zero) with the 128 threads, and is where a kernel's PDL wait goes.
// With `defer`, no copy reads key p (the new token's, which the kernel before writes or prep computes):
// when the block's range holds it (has_p), prep leaves its key and value rows in Kp / Vp [LD] and they
// go into their tile before it is used. The persistent kernel passes defer = false.
// CL: the nsplit blocks of a (sequence, kv head) are one thread-block cluster (nsplit <= kDecodeMaxCluster),
// splits as short as kTcClMinKeys keys, and the partials are combined through distributed shared memory
// (decode_cluster_finish_push, or decode_cluster_finish with kClPull); blocks without keys take part in the
// combine instead of returning.
#pragma once
#include <algorithm>
#include "decode_split.cuh"
#include "mma.cuh"

namespace g3cuda {

constexpr int kTcBK = 64, kTcWarps = 4, kTcMaxG = 8;
constexpr int kTcClMinKeys = 16;
// CL: how the splits combine. kClNone: global partials and a last block (decode_split_finish); kClPull: a
// cluster, each block reading its slice of the others' partials (decode_cluster_finish); kClPush: a
// cluster, each block sending the others' slices of its partial into them (decode_cluster_finish_push).
constexpr int kClNone = 0, kClPull = 1, kClPush = 2;

// The key range of split `split` of a decode query at position p: keys [js, je) of the visible
// jlo..p; ns splits in use (each at least min_keys: a 64-key tile's worth, or kTcClMinKeys in a cluster).
// A split past ns gets an empty range (js >= je).
struct DecodeSplitRange {
  int js, je, ns;
};
__device__ __forceinline__ DecodeSplitRange decode_split_range(int p, int window, int nsplit, int split,
                                                               int min_keys = kTcBK) {
  const int jlo = window > 0 ? max(0, p - window + 1) : 0;
  const int kvlen = p - jlo + 1;
  const int ns = max(1, min(nsplit, (kvlen + min_keys - 1) / min_keys));
  const int chunk = (kvlen + ns - 1) / ns;
  const int js = jlo + split * chunk;
  return {js, min(js + chunk, p + 1), ns};
}

template <int D, int STAGES>
constexpr size_t decode_tc_stage_bytes() {
  return (size_t)(16 + 2 * STAGES * kTcBK + 2) * (D + 8) * sizeof(bf16);
}
// Kp's offset in the block's shared memory (bf16 elements; Vp follows at + D + 8)
template <int D, int STAGES>
constexpr int decode_tc_kp_offset() {
  return (16 + 2 * STAGES * kTcBK) * (D + 8);
}
template <int D, int STAGES>
inline size_t decode_tc_smem_bytes(int nsplit) {
  // the combine: the warps' outputs, then 2 * G * nsplit floats of split weights or the block's partial
  // for a cluster combine (decode_split.cuh)
  const size_t tail = std::max<size_t>(2 * kTcMaxG * nsplit, 2 * kTcMaxG + kTcMaxG * D);
  const size_t combine = (size_t)16 * (D + 8) * sizeof(bf16) + (kTcWarps * kTcMaxG * (D + 8) + tail) * 4;
  return decode_tc_stage_bytes<D, STAGES>() > combine ? decode_tc_stage_bytes<D, STAGES>() : combine;
}
// kClPush: the receive buffer after the stages (tiles may still be in use when another block's slice arrives)
template <int D, int STAGES>
inline size_t decode_tc_push_smem_bytes(int nsplit) {
  // the warps' outputs (sm_o, from Ks) must end before the receive buffer
  static_assert(decode_tc_stage_bytes<D, STAGES>() % 16 == 0, "the receive buffer takes float4 stores");
  static_assert(16 * (D + 8) * sizeof(bf16) + kTcWarps * kTcMaxG * (D + 8) * 4 <= decode_tc_stage_bytes<D, STAGES>(),
                "the warps' outputs overlap the receive buffer");
  return std::max(decode_tc_smem_bytes<D, STAGES>(nsplit),
                  decode_tc_stage_bytes<D, STAGES>() +
                      (size_t)decode_cluster_recv_floats(kTcMaxG, kTcMaxG * D, nsplit) * sizeof(float));
}

template <int D, int STAGES, int CL = kClNone, typename Sync, typename Prep>
__device__ __forceinline__ void decode_tc_block(bf16* smem, Sync sync, Prep prep, bool defer, bf16* out,
                                                const bf16* kcache,
                                                const bf16* vcache, int64_t slot, int64_t row, int p, int b, int nb,
                                                int split, int kh, int NH, int KVH, int cap, int window, float scale,
                                                float softcap, int nsplit, float* part, unsigned* counters,
                                                uint64_t* cl_bar = nullptr) {
  constexpr int LD = D + 8;  // padded rows: conflict-free fragment loads
  constexpr int C8 = D / 8, DT = D / 8, BK = kTcBK, NT = kTcWarps * 32;
  bf16* Qs = smem;                   // [16][LD]
  bf16* Ks = Qs + 16 * LD;           // [STAGES][BK][LD]
  bf16* Vs = Ks + STAGES * BK * LD;  // [STAGES][BK][LD]
  bf16* Kp = Vs + STAGES * BK * LD;  // [LD] key p's row (defer)
  bf16* Vp = Kp + LD;                // [LD]
  __shared__ float sm_m[kTcWarps][kTcMaxG], sm_l[kTcWarps][kTcMaxG];
  __shared__ bool sm_last;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int G = NH / KVH;
  const DecodeSplitRange rg = decode_split_range(p, window, nsplit, split, CL ? kTcClMinKeys : kTcBK);
  const int ns = rg.ns;
  if (!CL && split >= ns) return;  // uniform over the 128 threads
  const int js = rg.js, je = rg.je;
  const int ntile = je > js ? (je - js + BK - 1) / BK : 0;

  const bf16* kbase = kcache + (slot * KVH + kh) * (int64_t)cap * D;
  const bf16* vbase = vcache + (slot * KVH + kh) * (int64_t)cap * D;
  auto load_tile = [&](int stage, int kb, int skip) {
    bf16* kd = Ks + stage * BK * LD;
    bf16* vd = Vs + stage * BK * LD;
    for (int c = tid; c < BK * C8; c += NT) {
      const int r = c / C8, cc = c % C8, j = kb + r;
      if (j == skip) continue;  // copied from Kp / Vp (no zero fill either: it would race with that store)
      const bool ok = j < je;
      const int64_t off = (int64_t)(ok ? j % cap : 0) * D + cc * 8;
      cp_async16(kd + r * LD + cc * 8, kbase + off, ok);
      cp_async16(vd + r * LD + cc * 8, vbase + off, ok);
    }
    cp_async_commit();
  };
  // prologue: tiles 0 .. STAGES-2 in flight (empty groups past the last tile keep the count uniform)
  const bool has_p = defer && p >= js && p < je;
  const int skip = has_p ? p : -1;
  const int tp = has_p ? (p - js) / BK : -1;  // the tile that holds key p
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ntile) load_tile(st, js + st * BK, skip);
    else cp_async_commit();
  }
  prep(Qs, LD, Kp, Vp, has_p);
  if constexpr (CL <= kClPull) G3_TRACE_MARK(0);  // the query rows staged (trace.cuh; nothing without GEMMA3_TRACE)

  const float kLog2e = 1.4426950408889634f;
  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, l0 = 0.f;  // row g (a query head); rows g + 8 are padding and never read

  for (int t = 0; t < ntile; ++t) {
    // tile t + STAGES - 1 into the stage computed in iteration t - 1 (free after its closing barrier)
    if (t + STAGES - 1 < ntile) load_tile((t + STAGES - 1) % STAGES, js + (t + STAGES - 1) * BK, skip);
    else cp_async_commit();
    cp_async_wait<STAGES - 1>();  // tile t has landed
    sync();
    if (t == tp) {  // key p's rows into the tile (uniform over the block)
      const int r = (p - js) % BK;
      for (int c = tid; c < 2 * C8; c += NT) {
        const int cc = c % C8;
        const bf16* src = (c < C8 ? Kp : Vp) + cc * 8;
        *reinterpret_cast<uint4*>((c < C8 ? Ks : Vs) + ((t % STAGES) * BK + r) * LD + cc * 8) =
            *reinterpret_cast<const uint4*>(src);
      }
      sync();
    }
    const int kw = js + t * BK + warp * 16;  // this warp's first key
    if (kw < je) {
      const bf16* Kw = Ks + ((t % STAGES) * BK + warp * 16) * LD;
      const bf16* Vw = Vs + ((t % STAGES) * BK + warp * 16) * LD;
      // S = Q K^T over 16 keys: two accumulator pairs (even/odd k-steps) halve the dependent chain
      // fragments by ldmatrix (one instruction for Q's four registers, one for both key groups' four): lane l
      // addresses row (l & 7) of the 8x8 matrix l >> 3
      float sa[2][4] = {}, sb[2][4] = {};
      const bf16* qrow = Qs + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
      const bf16* krow = Kw + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int dc = 0; dc < D / 16; ++dc) {
        uint32_t a[4], kb[4];
        ldsm_x4(a, qrow + dc * 16);
        ldsm_x4(kb, krow + dc * 16);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          if (dc & 1)
            mma_bf16(sb[nt], a[0], a[1], a[2], a[3], kb[2 * nt], kb[2 * nt + 1]);
          else
            mma_bf16(sa[nt], a[0], a[1], a[2], a[3], kb[2 * nt], kb[2 * nt + 1]);
        }
      }
      float s[2][2];  // row g: keys kw + nt*8 + 2*t4 + e
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = (sa[nt][e] + sb[nt][e]) * scale;
          if (softcap > 0.f) v = tanhf(v / softcap) * softcap;
          v *= kLog2e;
          v = kw + nt * 8 + 2 * t4 + e < je ? v : -INFINITY;
          s[nt][e] = v;
          mx = fmaxf(mx, v);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m0, mx);  // finite: the warp's first key is valid
      const float corr = exp2f(m0 - mn);
      m0 = mn;
      float ps = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[nt][e] = exp2f(s[nt][e] - mn);
          ps += s[nt][e];
        }
      l0 = l0 * corr + ps;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][0] *= corr;
        o[dt][1] *= corr;
      }
      // O += P V: P (16 heads x 16 keys) as the A operand, rows g + 8 zero
      // V's fragments by ldmatrix.trans, two 8-wide column groups an instruction
      const uint32_t a0 = pack_bf16(s[0][0], s[0][1]), a2 = pack_bf16(s[1][0], s[1][1]);
      const bf16* vrow = Vw + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
      for (int dt = 0; dt < DT; dt += 2) {
        uint32_t vb[4];
        ldsm_x4_t(vb, vrow + dt * 8);
        mma_bf16(o[dt], a0, 0u, a2, 0u, vb[0], vb[1]);
        mma_bf16(o[dt + 1], a0, 0u, a2, 0u, vb[2], vb[3]);
      }
    }
    sync();  // stage t % STAGES is overwritten by the load issued in iteration t + 1
  }
  G3_TRACE_MARK(CL <= kClPull ? 1 : 0);  // the key tiles done
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);

  // combine the 4 warps: their rows g < G into shared memory (the K/V stages are free now)
  // rows of LDO floats: the heads' float2 stores fall in different banks; a warp without keys (max -inf,
  // which the combines weigh 0 without reading its row) stores only its max and sum
  constexpr int LDO = D + 8;
  float* sm_o = reinterpret_cast<float*>(Ks);  // [kTcWarps][kTcMaxG][LDO]
  if (g < G) {
    if (t4 == 0) {
      sm_m[warp][g] = m0;
      sm_l[warp][g] = l0;
    }
    if (m0 != -INFINITY) {
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<float2*>(sm_o + (warp * kTcMaxG + g) * LDO + dt * 8 + 2 * t4) = make_float2(o[dt][0], o[dt][1]);
    }
  }
  sync();
  if constexpr (CL == kClPush) {
    decode_cluster_finish_push<bf16, kTcWarps, NT, true>(
        out, &sm_m[0][0], &sm_l[0][0], kTcMaxG, sm_o, LDO,
        reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + decode_tc_stage_bytes<D, STAGES>()), cl_bar, G, D, ns,
        nsplit, split, kh, NH, row);
    return;
  } else if constexpr (CL == kClPull) {
    decode_cluster_finish<bf16, kTcWarps, NT, true>(out, &sm_m[0][0], &sm_l[0][0], kTcMaxG, sm_o, LDO,
                                                    sm_o + kTcWarps * kTcMaxG * LDO, G, D, ns, nsplit, split, kh, NH,
                                                    row);
    return;
  }
  decode_split_finish<bf16, kTcWarps, NT, true>(out, &sm_m[0][0], &sm_l[0][0], kTcMaxG, sm_o, LDO,
                                                sm_o + kTcWarps * kTcMaxG * LDO, &sm_last, G, D, ns, nsplit, split, b, nb,
                                                kh, NH, KVH, row, part, counters, sync);
}

}  // namespace g3cuda
