// attention_prefill.cu: prefill attention on tensor cores (mma.sync m16n8k16, bf16 in, float32
// accumulate), flash style. A block takes 64 queries of one sequence's chunk and one head (4 warps x
// 16 query rows); it walks key tiles from the first key any of its queries can see (whole tiles
// before the sliding window are never visited) to its last query, with an online softmax in base 2.
// Keys before the sequence's start come from its KV cache (ring slot j % cap), the chunk's own keys
// from knew/vnew, so a chunk longer than the window never reads an overwritten slot. Causal and
// window masks per element, GQA (kv head = head / (NH/KVH)), optional tanh soft-cap. With seq.extent
// (multimodal prefill) a query sees keys up to its extent instead of its own position: the block walks
// to the largest extent of its queries and each warp to the largest of its rows.
// Shared memory rows are padded by 16 bytes, which makes the fragment loads conflict-free.
#include "kernels.cuh"
#include "mma.cuh"

namespace g3cuda {

constexpr int BQ = 64, NWARP = 4;


template <int D, int BK>
__global__ void __launch_bounds__(NWARP * 32) attention_prefill_tc_kernel(
    bf16* out, const bf16* q, const bf16* knew, const bf16* vnew, const bf16* kcache, const bf16* vcache, SeqMeta seq,
    const int2* tiles, int NH, int KVH, int cap, int window, float scale, float softcap) {
  G3_PDL_ENTRY();
  constexpr int LD = D + 8;
  constexpr int NT = BK / 8;   // key n-tiles of 8 in S
  constexpr int DT = D / 8;    // dim n-tiles of 8 in O
  constexpr int C8 = D / 8;    // 16-byte chunks per row
  extern __shared__ uint4 smem_u4[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_u4);
  bf16* Ks = Qs + BQ * LD;
  bf16* Vs = Ks + BK * LD;

  const int2 tile = tiles[blockIdx.x];
  const int sb = tile.x, qi0 = tile.y, h = blockIdx.y;
  const int kh = h / (NH / KVH);
  const int start = seq.start[sb], n = seq.len[sb], t0 = seq.t0[sb];
  const int64_t slot = seq.slot[sb];
  const int nq = min(BQ, n - qi0);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;

  for (int c = tid; c < BQ * C8; c += NWARP * 32) {
    const int r = c / C8, cc = c % C8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < nq) v = *reinterpret_cast<const uint4*>(q + (((int64_t)t0 + qi0 + r) * NH + h) * D + cc * 8);
    *reinterpret_cast<uint4*>(Qs + r * LD + cc * 8) = v;
  }
  const int p_first = start + qi0, p_last = start + qi0 + nq - 1;
  const int jlo = window > 0 ? max(0, p_first - window + 1) : 0;
  // last key position query row r (< nq) sees: its own, or its extent clamped to the chunk's end
  const int* ext = seq.extent;
  auto row_hi = [&](int r) {
    const int p = p_first + r;
    return ext ? min(max(p, ext[t0 + qi0 + r]), start + n - 1) : p;
  };
  int k_last = p_last;  // the last key any query of the block sees
  if (ext) {
    __shared__ int s_hi;
    if (tid == 0) s_hi = p_last;
    __syncthreads();
    for (int r = tid; r < nq; r += NWARP * 32) atomicMax(&s_hi, row_hi(r));
    __syncthreads();
    k_last = s_hi;
  }
  // this thread's two query rows (absolute positions); rows past the chunk are masked entirely
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int pr0 = r0 < nq ? p_first + r0 : -1;
  const int pr1 = r1 < nq ? p_first + r1 : -1;
  const int hi0 = r0 < nq ? row_hi(r0) : -1;
  const int hi1 = r1 < nq ? row_hi(r1) : -1;
  // last key among this warp's rows
  const int wmax = ext ? (int)__reduce_max_sync(0xffffffffu, (unsigned)max(max(hi0, hi1), 0))
                       : min(p_last, p_first + warp * 16 + 15);
  const int wmin = p_first + warp * 16;
  const float kLog2e = 1.4426950408889634f;

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  const bf16* kc = kcache + (slot * KVH + kh) * cap * D;
  const bf16* vc = vcache + (slot * KVH + kh) * cap * D;
  for (int kb = jlo; kb <= k_last; kb += BK) {
    __syncthreads();
    for (int c = tid; c < BK * C8; c += NWARP * 32) {
      const int r = c / C8, cc = c % C8;
      const int j = kb + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (j <= k_last) {
        const int64_t off = j < start ? (int64_t)(j % cap) * D : (((int64_t)t0 + j - start) * KVH + kh) * D - 0;
        const bf16* ks = j < start ? kc + off : knew + off;
        const bf16* vs = j < start ? vc + off : vnew + off;
        kv = *reinterpret_cast<const uint4*>(ks + cc * 8);
        vv = *reinterpret_cast<const uint4*>(vs + cc * 8);
      }
      *reinterpret_cast<uint4*>(Ks + r * LD + cc * 8) = kv;
      *reinterpret_cast<uint4*>(Vs + r * LD + cc * 8) = vv;
    }
    __syncthreads();
    // this warp sees nothing of the tile: all keys after its last row, or all before its window
    if (wmin > p_last || kb > wmax || (window > 0 && kb + BK - 1 <= wmin - window)) continue;

    float sacc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
    for (int dc = 0; dc < D / 16; ++dc) {
      const bf16* qa = Qs + (warp * 16 + g) * LD + dc * 16 + 2 * t4;
      const uint32_t a0 = lds32(qa), a1 = lds32(qa + 8 * LD), a2 = lds32(qa + 8), a3 = lds32(qa + 8 * LD + 8);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const bf16* kp = Ks + (nt * 8 + g) * LD + dc * 16 + 2 * t4;
        mma_bf16(sacc[nt], a0, a1, a2, a3, lds32(kp), lds32(kp + 8));
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pr = e < 2 ? pr0 : pr1, hi = e < 2 ? hi0 : hi1;
        const int j = kb + nt * 8 + 2 * t4 + (e & 1);
        float s = sacc[nt][e] * scale;
        if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
        s *= kLog2e;
        const bool ok = pr >= 0 && j <= hi && (window == 0 || j > pr - window);
        s = ok ? s : -INFINITY;
        sacc[nt][e] = s;
        if (e < 2) mx0 = fmaxf(mx0, s); else mx1 = fmaxf(mx1, s);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
    const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      sacc[nt][0] = exp2f(sacc[nt][0] - base0);
      sacc[nt][1] = exp2f(sacc[nt][1] - base0);
      sacc[nt][2] = exp2f(sacc[nt][2] - base1);
      sacc[nt][3] = exp2f(sacc[nt][3] - base1);
      ps0 += sacc[nt][0] + sacc[nt][1];
      ps1 += sacc[nt][2] + sacc[nt][3];
    }
    l0 = l0 * corr0 + ps0;
    l1 = l1 * corr1 + ps1;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= corr0;
      o[dt][1] *= corr0;
      o[dt][2] *= corr1;
      o[dt][3] *= corr1;
    }
#pragma unroll
    for (int kc2 = 0; kc2 < BK / 16; ++kc2) {
      const uint32_t a0 = pack_bf16(sacc[2 * kc2][0], sacc[2 * kc2][1]);
      const uint32_t a1 = pack_bf16(sacc[2 * kc2][2], sacc[2 * kc2][3]);
      const uint32_t a2 = pack_bf16(sacc[2 * kc2 + 1][0], sacc[2 * kc2 + 1][1]);
      const uint32_t a3 = pack_bf16(sacc[2 * kc2 + 1][2], sacc[2 * kc2 + 1][3]);
      const bf16* v0 = Vs + (kc2 * 16 + 2 * t4) * LD + g;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const bf16* vp = v0 + dt * 8;
        const uint32_t b0 = pack_bf16_raw(vp[0], vp[LD]);
        const uint32_t b1 = pack_bf16_raw(vp[8 * LD], vp[9 * LD]);
        mma_bf16(o[dt], a0, a1, a2, a3, b0, b1);
      }
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
  bf16* o0 = out + (((int64_t)t0 + qi0 + r0) * NH + h) * D + 2 * t4;
  bf16* o1 = out + (((int64_t)t0 + qi0 + r1) * NH + h) * D + 2 * t4;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    if (r0 < nq) *reinterpret_cast<__nv_bfloat162*>(o0 + dt * 8) = __floats2bfloat162_rn(o[dt][0] * i0, o[dt][1] * i0);
    if (r1 < nq) *reinterpret_cast<__nv_bfloat162*>(o1 + dt * 8) = __floats2bfloat162_rn(o[dt][2] * i1, o[dt][3] * i1);
  }
}

bool attention_prefill_tc_supported(int D) { return D == 128 || D == 256; }

template <int D, int BK>
static void launch_tc(bf16* out, const bf16* q, const bf16* knew, const bf16* vnew, const bf16* kcache,
                      const bf16* vcache, SeqMeta seq, const int2* tiles, int ntiles, int NH, int KVH, int cap,
                      int window, float scale, float softcap, cudaStream_t s) {
  const size_t smem = (size_t)(BQ + 2 * BK) * (D + 8) * sizeof(bf16);
  static bool attr_set = false;  // per instantiation; the attribute is per device function
  if (!attr_set) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_tc_kernel<D, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem));
    attr_set = true;
  }
  launch_k(attention_prefill_tc_kernel<D, BK>, dim3(ntiles, NH), NWARP * 32, smem, s, out, q, knew, vnew, kcache, vcache, seq,
                                                                                tiles, NH, KVH, cap, window, scale,
                                                                                softcap);
  CUDA_LAUNCH_CHECK();
}

void attention_prefill_tc(bf16* out, const bf16* q, const bf16* knew, const bf16* vnew, const bf16* kcache,
                          const bf16* vcache, SeqMeta seq, const int2* tiles, int ntiles, int NH, int KVH, int D,
                          int cap, int window, float scale, float softcap, cudaStream_t s) {
  if (ntiles <= 0) return;
  if (D == 256)
    launch_tc<256, 32>(out, q, knew, vnew, kcache, vcache, seq, tiles, ntiles, NH, KVH, cap, window, scale, softcap, s);
  else if (D == 128)
    launch_tc<128, 64>(out, q, knew, vnew, kcache, vcache, seq, tiles, ntiles, NH, KVH, cap, window, scale, softcap, s);
  else
    throw std::invalid_argument("attention_prefill_tc: head_dim must be 128 or 256");
}

}  // namespace g3cuda
