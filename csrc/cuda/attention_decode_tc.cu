// attention_decode_tc.cu: decode attention on tensor cores (bf16, head_dim 128 or 256), split over the
// key range (flash-decoding). The NH/KVH query heads of one kv head are the rows of an m16n8k16 tile
// (zero rows pad them to 16), so every key/value row is read once for all of them, and a 16-key
// slice costs a short run of independent mma.sync instead of the per-key chain of dependent loads,
// shuffles and exp of the CUDA-core kernels (attention_decode.cu), which were latency-bound.
// Block (split, kv head, sequence) of 4 warps: 64-key tiles staged into shared memory with cp.async,
// STAGES deep (3 where shared memory allows: long key ranges are bound by the bytes in flight per SM,
// one block per SM at head_dim 256); warp w takes keys 16w..16w+15 of a
// tile with its own online softmax (base 2); the warps combine in shared memory; with several splits
// each writes a partial (max, sum, unnormalised output) and the last block of a (sequence, kv head)
// to finish (an atomic counter, left at 0 for the next graph replay) combines them.
// Local layers visit only the last `window` positions, in ring slots j % cap.
#include "decode_split.cuh"
#include "kernels.cuh"
#include "mma.cuh"

namespace g3cuda {

namespace {

constexpr int kTcBK = 64, kTcWarps = 4, kTcMaxG = 8;


}  // namespace

template <int D, int STAGES>
__global__ void __launch_bounds__(kTcWarps * 32) attention_decode_tc_kernel(
    bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int NH, int KVH, int cap, int window,
    float scale, float softcap, int nsplit, float* part, unsigned* counters) {
  G3_PDL_ENTRY();
  constexpr int LD = D + 8;  // padded rows: conflict-free fragment loads
  constexpr int C8 = D / 8, DT = D / 8, BK = kTcBK, NT = kTcWarps * 32;
  extern __shared__ uint4 smem_u4[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_u4);  // [16][LD]
  bf16* Ks = Qs + 16 * LD;                      // [STAGES][BK][LD]
  bf16* Vs = Ks + STAGES * BK * LD;             // [STAGES][BK][LD]
  __shared__ float sm_m[kTcWarps][kTcMaxG], sm_l[kTcWarps][kTcMaxG];
  __shared__ bool sm_last;

  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int G = NH / KVH;
  const int p = seq.start[b];
  const int64_t row = seq.t0[b];
  const int64_t slot = seq.slot[b];
  const int jlo = window > 0 ? max(0, p - window + 1) : 0;
  const int kvlen = p - jlo + 1;
  const int ns = max(1, min(nsplit, (kvlen + BK - 1) / BK));  // splits in use: at least a tile's worth each
  if (split >= ns) return;                                     // uniform per block
  const int chunk = (kvlen + ns - 1) / ns;
  const int js = jlo + split * chunk, je = min(js + chunk, p + 1);
  const int ntile = je > js ? (je - js + BK - 1) / BK : 0;

  const bf16* kbase = kcache + (slot * KVH + kh) * (int64_t)cap * D;
  const bf16* vbase = vcache + (slot * KVH + kh) * (int64_t)cap * D;
  auto load_tile = [&](int stage, int kb) {
    bf16* kd = Ks + stage * BK * LD;
    bf16* vd = Vs + stage * BK * LD;
    for (int c = tid; c < BK * C8; c += NT) {
      const int r = c / C8, cc = c % C8, j = kb + r;
      const bool ok = j < je;
      const int64_t off = (int64_t)(ok ? j % cap : 0) * D + cc * 8;
      cp_async16(kd + r * LD + cc * 8, kbase + off, ok);
      cp_async16(vd + r * LD + cc * 8, vbase + off, ok);
    }
    cp_async_commit();
  };
  // prologue: tiles 0 .. STAGES-2 in flight (empty groups past the last tile keep the count uniform)
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ntile) load_tile(st, js + st * BK);
    else cp_async_commit();
  }
  // the query heads of this kv head as rows 0..G-1, zero rows up to 16
  for (int c = tid; c < 16 * C8; c += NT) {
    const int r = c / C8, cc = c % C8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < G) v = *reinterpret_cast<const uint4*>(q + (row * NH + kh * G + r) * D + cc * 8);
    *reinterpret_cast<uint4*>(Qs + r * LD + cc * 8) = v;
  }

  const float kLog2e = 1.4426950408889634f;
  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, l0 = 0.f;  // row g (a query head); rows g + 8 are padding and never read

  for (int t = 0; t < ntile; ++t) {
    // tile t + STAGES - 1 into the stage computed in iteration t - 1 (free after its closing barrier)
    if (t + STAGES - 1 < ntile) load_tile((t + STAGES - 1) % STAGES, js + (t + STAGES - 1) * BK);
    else cp_async_commit();
    cp_async_wait<STAGES - 1>();  // tile t has landed
    __syncthreads();
    const int kw = js + t * BK + warp * 16;  // this warp's first key
    if (kw < je) {
      const bf16* Kw = Ks + ((t % STAGES) * BK + warp * 16) * LD;
      const bf16* Vw = Vs + ((t % STAGES) * BK + warp * 16) * LD;
      // S = Q K^T over 16 keys: two accumulator pairs (even/odd k-steps) halve the dependent chain
      float sa[2][4] = {}, sb[2][4] = {};
#pragma unroll
      for (int dc = 0; dc < D / 16; ++dc) {
        const bf16* qa = Qs + g * LD + dc * 16 + 2 * t4;
        const uint32_t a0 = lds32(qa), a1 = lds32(qa + 8 * LD), a2 = lds32(qa + 8), a3 = lds32(qa + 8 * LD + 8);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const bf16* kp = Kw + (nt * 8 + g) * LD + dc * 16 + 2 * t4;
          if (dc & 1)
            mma_bf16(sb[nt], a0, a1, a2, a3, lds32(kp), lds32(kp + 8));
          else
            mma_bf16(sa[nt], a0, a1, a2, a3, lds32(kp), lds32(kp + 8));
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
      const uint32_t a0 = pack_bf16(s[0][0], s[0][1]), a2 = pack_bf16(s[1][0], s[1][1]);
      const bf16* v0 = Vw + (2 * t4) * LD + g;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const bf16* vp = v0 + dt * 8;
        mma_bf16(o[dt], a0, 0u, a2, 0u, pack_bf16_raw(vp[0], vp[LD]), pack_bf16_raw(vp[8 * LD], vp[9 * LD]));
      }
    }
    __syncthreads();  // stage t % STAGES is overwritten by the load issued in iteration t + 1
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);

  // combine the 4 warps: their rows g < G into shared memory (the K/V stages are free now)
  float* sm_o = reinterpret_cast<float*>(Ks);  // [kTcWarps][kTcMaxG][D]
  if (g < G) {
    if (t4 == 0) {
      sm_m[warp][g] = m0;
      sm_l[warp][g] = l0;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      sm_o[(warp * kTcMaxG + g) * D + dt * 8 + 2 * t4] = o[dt][0];
      sm_o[(warp * kTcMaxG + g) * D + dt * 8 + 2 * t4 + 1] = o[dt][1];
    }
  }
  __syncthreads();
  decode_split_finish<bf16, kTcWarps, NT, true>(out, &sm_m[0][0], &sm_l[0][0], kTcMaxG, sm_o, D,
                                                sm_o + kTcWarps * kTcMaxG * D, &sm_last, G, D, ns, nsplit, split, b,
                                                kh, NH, KVH, row, part, counters);
}

bool attention_decode_tc_supported(int NH, int KVH, int D) {
  return (D == 128 || D == 256) && NH % KVH == 0 && NH / KVH <= kTcMaxG;
}

template <int D, int STAGES>
static size_t decode_tc_smem(int nsplit) {
  const size_t stages = (size_t)(16 + 2 * STAGES * kTcBK) * (D + 8) * sizeof(bf16);
  // the combine: the warps' outputs, then 2 * G * nsplit floats of split weights (decode_split.cuh)
  const size_t combine = (size_t)16 * (D + 8) * sizeof(bf16) + (size_t)(kTcWarps * kTcMaxG * D + 2 * kTcMaxG * nsplit) * 4;
  return std::max(stages, combine);
}

template <int D, int STAGES>
static void launch_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B,
                             int NH, int KVH, int cap, int window, float scale, float softcap, int nsplit, float* part,
                             unsigned* counters, size_t smem, cudaStream_t s) {
  static size_t attr = 0;  // per instantiation: the attribute is per device function
  if (smem > attr) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_decode_tc_kernel<D, STAGES>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)std::max<size_t>(smem, 48 * 1024)));
    attr = std::max<size_t>(smem, 48 * 1024);
  }
  launch_k(attention_decode_tc_kernel<D, STAGES>, dim3(nsplit, KVH, B), kTcWarps * 32, smem, s, out, q, kcache, vcache,
           seq, NH, KVH, cap, window, scale, softcap, nsplit, part, counters);
  CUDA_LAUNCH_CHECK();
}

// Three stages where the device's per-block shared memory allows (H100: 206 KB at head_dim 256), else two.
template <int D>
static void dispatch_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B,
                               int NH, int KVH, int cap, int window, float scale, float softcap, int nsplit, float* part,
                               unsigned* counters, cudaStream_t s) {
  static int optin = -1;
  if (optin < 0) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  }
  const size_t s3 = decode_tc_smem<D, 3>(nsplit);
  if (s3 <= (size_t)optin)
    launch_decode_tc<D, 3>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters,
                           s3, s);
  else
    launch_decode_tc<D, 2>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters,
                           decode_tc_smem<D, 2>(nsplit), s);
}

void attention_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B, int NH,
                         int KVH, int D, int cap, int window, float scale, float softcap, int nsplit, float* part,
                         unsigned* counters, cudaStream_t s) {
  if (B <= 0) return;
  if (!attention_decode_tc_supported(NH, KVH, D))
    throw std::invalid_argument("attention_decode_tc: head_dim must be 128 or 256 and at most 8 query heads per kv head");
  if (nsplit < 1 || nsplit > kDecodeMaxSplit)
    throw std::invalid_argument("attention_decode_tc: nsplit must be 1.." + std::to_string(kDecodeMaxSplit));
  if (D == 256)
    dispatch_decode_tc<256>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters, s);
  else
    dispatch_decode_tc<128>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters, s);
}

}  // namespace g3cuda
