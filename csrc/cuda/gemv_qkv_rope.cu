// gemv_qkv_rope.cu: the decode step's q/k/v product with QK-norm, RoPE and the KV-cache write done in the
// same kernel (bf16, 1-2 tokens, sm_90): the per-operation path's GEMV then qk_rope_kv, in one launch.
// A head's D rows are spread over a thread-block cluster of D / 16 blocks; each warp computes the two
// rows of one RoPE pair (i, i + D/2), so the rotation needs nothing from other warps. QK-norm needs the
// head's sum of squares: each block sums its pairs, the blocks exchange the partials through distributed
// shared memory (two cluster barriers), and every block adds them in rank order (double, so the same
// statistic to float32 as qk_rope_kv's). Then the warp normalises, rotates, rounds to bf16 and stores q,
// or k / v and their cache slot (pos % cap, where kv_direct_ok: always in decode).
// NORM: x is made by every block from the residual step, as gemv_residual does (residual_step.cuh), so
// this kernel also takes the launch of the step before it; block 0 writes the new residual row.
// pre: the weight rows' first round of loads, the norm weights and the RoPE angles before the PDL wait.
#include <map>
#include "gemv_chunk.cuh"
#include "kernels.cuh"
#include "residual_step.cuh"

namespace g3cuda {

constexpr int kQkvThreads = 256;                  // 8 warps
constexpr int kQkvPairsPerBlock = kQkvThreads / 32;  // a RoPE pair (two rows) per warp: 16 rows per block

template <int M, int U, bool NORM, int P>
__global__ void __launch_bounds__(kQkvThreads) gemv_qkv_rope_kernel(QkvRope a, const bf16* __restrict__ x,
                                                                     const bf16* __restrict__ W, GemvResidual rn,
                                                                     int pdl) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  G3_PDL_TRIGGER_EARLY(pdl);
  const bool pre = pdl & kPdlPrologue;
  __shared__ __align__(16) bf16 xs[NORM ? M * kQkvThreads * P : 8];
  __shared__ double sh[NORM ? 33 : 1];
  __shared__ double wpart[kQkvPairsPerBlock][M];  // each warp's sum of squares
  __shared__ double bpart[M];                     // the block's: read by the whole cluster
  const int D = a.D, K = a.K, half = D / 2, C = D / 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rank = blockIdx.x % C, hs = blockIdx.x / C;  // 1-d clusters of C consecutive blocks: one head
  const int i = rank * kQkvPairsPerBlock + warp;         // this warp's pair (i, i + half) of the head
  const int kind = hs < a.NH ? 0 : (hs < a.NH + a.KVH ? 1 : 2);  // q, k, v
  const float* nwt = kind == 0 ? a.q_w : (kind == 1 ? a.k_w : nullptr);
  const bool exchange = (a.q_w || a.k_w) && C > 1;  // the same for every block: all take the barriers
  const int K8 = K / 8;
  const uint4* wr[2] = {reinterpret_cast<const uint4*>(W + ((int64_t)hs * D + i) * K),
                        reinterpret_cast<const uint4*>(W + ((int64_t)hs * D + i + half) * K)};
  uint4 wv[2][U];
  auto load_w = [&](int c0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * 32;
        wv[r][u] = c < K8 ? __ldcs(wr[r] + c) : make_uint4(0, 0, 0, 0);  // streamed once
      }
  };
  float wa = 0.f, wb = 0.f, cs[M], sn[M];
  int pos[M];
  auto prologue = [&] {
    if (nwt) {
      wa = nwt[i];
      wb = nwt[i + half];
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      pos[m] = a.tok.pos[m];
      const float ang = kind < 2 && a.inv_freq ? __fmul_rn((float)pos[m], a.inv_freq[i]) : 0.f;
      cs[m] = (float)cos((double)ang);
      sn[m] = (float)sin((double)ang);
    }
  };
  FusedResidualStep<M, NORM ? P : 1, kQkvThreads> res;
  if (pre) {
    load_w(lane);
    prologue();
  }
  if constexpr (NORM) res.load_before_wait(rn, K, pdl);
  G3_PDL_WAIT_FLAGS(pdl);
  if (!pre) prologue();
  if constexpr (NORM) res.load_after_wait(rn, K, pdl);
  if constexpr (NORM) res.make_x(xs, rn, K, sh);
  float acc[2][M];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  for (int c0 = lane; c0 < K8; c0 += 32 * U) {
    if (c0 != lane || !pre) load_w(c0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32;
      if (c < K8) gemv_chunk_fma<M, 2, U, NORM>(acc, wv, u, NORM ? xs : x, K, c);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[0][m] = warp_sum(acc[0][m]);  // every lane has the pair's two values
    acc[1][m] = warp_sum(acc[1][m]);
  }
  double ss[M];
  if (nwt) {
#pragma unroll
    for (int m = 0; m < M; ++m) ss[m] = (double)acc[0][m] * acc[0][m] + (double)acc[1][m] * acc[1][m];
  }
  if (exchange) {
    if (nwt && lane == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) wpart[warp][m] = ss[m];
    __syncthreads();
    if (nwt && threadIdx.x < M) {
      double t = 0.0;
      for (int w = 0; w < kQkvPairsPerBlock; ++w) t += wpart[w][threadIdx.x];
      bpart[threadIdx.x] = t;
    }
    cluster_sync();  // every block's partial is written
    if (nwt)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        double t = 0.0;
        for (int r = 0; r < C; ++r) t += *cluster_map(&bpart[m], r);
        ss[m] = t;
      }
    cluster_arrive();  // done reading the others' partials; waited for before exit
  } else if (nwt) {  // one block per head (D = 16)
    if (lane == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) wpart[warp][m] = ss[m];
    __syncthreads();
#pragma unroll
    for (int m = 0; m < M; ++m) {
      double t = 0.0;
      for (int w = 0; w < kQkvPairsPerBlock; ++w) t += wpart[w][m];
      ss[m] = t;
    }
  }
  if (lane < M) {  // lane m stores token m's pair
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m != lane) continue;
      float va = acc[0][m], vb = acc[1][m];
      if (nwt) {
        const float r = 1.f / sqrtf((float)(ss[m] / D) + a.eps);
        va = (va * r) * (1.f + wa);
        vb = (vb * r) * (1.f + wb);
      }
      if (kind < 2 && a.inv_freq) {
        const float xa = va, xb = vb;
        va = __fsub_rn(__fmul_rn(xa, cs[m]), __fmul_rn(xb, sn[m]));
        vb = __fadd_rn(__fmul_rn(xb, cs[m]), __fmul_rn(xa, sn[m]));
      }
      const bf16 ba = __float2bfloat16_rn(va), bb = __float2bfloat16_rn(vb);
      bf16* dst;
      bf16* cdst = nullptr;
      if (kind == 0) {
        dst = a.q + ((int64_t)m * a.NH + hs) * D;
      } else {
        const int kh = kind == 1 ? hs - a.NH : hs - a.NH - a.KVH;
        dst = (kind == 1 ? a.knew : a.vnew) + ((int64_t)m * a.KVH + kh) * D;
        const int sq = a.tok.seq[m];
        if (kv_direct_ok(a.local, m - a.seq.t0[sq], pos[m], a.cap))
          cdst = (kind == 1 ? a.kcache : a.vcache) +
                 (((int64_t)a.seq.slot[sq] * a.KVH + kh) * a.cap + pos[m] % a.cap) * D;
      }
      dst[i] = ba;
      dst[i + half] = bb;
      if (cdst) {
        cdst[i] = ba;
        cdst[i + half] = bb;
      }
    }
  }
  if (exchange) cluster_wait();  // keep this block's partial alive until the cluster has read it
#endif
}

// 16-byte weight loads per lane per row in flight: rows up to 768 elements in one round of 3, longer ones
// in rounds of 5 (only the first before the PDL wait). 10 at 4B (one round, 166 registers) measured slower:
// one block per SM.
static int qkv_unroll(int K) { return K / 8 <= 32 * 3 ? 3 : 5; }

template <int M, int U, bool NORM, int P>
static void (*qkv_kernel_ptr())(QkvRope, const bf16*, const bf16*, GemvResidual, int) {
  static bool init = false;
  auto k = gemv_qkv_rope_kernel<M, U, NORM, P>;
  if (!init) {  // clusters of 16 blocks (head_dim 256) are beyond the portable size of 8
    CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    init = true;
  }
  return k;
}

template <int M, int U>
static auto qkv_kernel(bool norm, int K) -> void (*)(QkvRope, const bf16*, const bf16*, GemvResidual, int) {
  if (!norm) return qkv_kernel_ptr<M, U, false, 1>();
  return K <= kQkvThreads * 5 ? qkv_kernel_ptr<M, U, true, 5>() : qkv_kernel_ptr<M, U, true, 10>();
}
static auto qkv_kernel_for(int M, int K, bool norm) -> void (*)(QkvRope, const bf16*, const bf16*, GemvResidual, int) {
  const bool u3 = qkv_unroll(K) == 3;
  if (M == 1) return u3 ? qkv_kernel<1, 3>(norm, K) : qkv_kernel<1, 5>(norm, K);
  return u3 ? qkv_kernel<2, 3>(norm, K) : qkv_kernel<2, 5>(norm, K);
}

// How many clusters of C blocks of the kernel can be resident at once (cudaOccupancyMaxActiveClusters; 0 where
// it cannot run), asked once per kernel instantiation and cluster size.
static int max_clusters(void (*kern)(QkvRope, const bf16*, const bf16*, GemvResidual, int), int C) {
  static std::map<std::pair<void*, int>, int> cache;
  const auto key = std::make_pair(reinterpret_cast<void*>(kern), C);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(C);
  cfg.blockDim = dim3(kQkvThreads);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim = {(unsigned)C, 1u, 1u};
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  cache[key] = n;
  return n;
}

static bool shape_ok(int M, int K, int D) {
  return device_cc() >= 90 && M >= 1 && M <= 2 && K % 8 == 0 && K <= kQkvThreads * kGemvResidualPer && D >= 16 &&
         D % 16 == 0 && D / 16 <= 16;
}

// Supported where one cluster of the largest instantiation (two tokens, the residual step of the widest rows)
// can be resident.
bool gemv_qkv_rope_supported(int M, int K, int D) {
  return shape_ok(M, K, D) && max_clusters(qkv_kernel_for(2, kQkvThreads * kGemvResidualPer, true), D / 16) > 0;
}

int gemv_qkv_rope_max_clusters(int M, int K, int D, bool norm) {
  return gemv_qkv_rope_supported(M, K, D) ? max_clusters(qkv_kernel_for(M, K, norm), D / 16) : 0;
}

void gemv_qkv_rope(const QkvRope& a, const bf16* x, const bf16* W, int M, const GemvResidual* rn, cudaStream_t s) {
  if (M <= 0) return;
  if (!gemv_qkv_rope_supported(M, a.K, a.D))
    throw std::invalid_argument("gemv_qkv_rope: needs sm_90, M <= 2, K % 8 == 0, K <= " +
                                std::to_string(kQkvThreads * kGemvResidualPer) +
                                ", head_dim a multiple of 16 up to 256 (M=" + std::to_string(M) +
                                " K=" + std::to_string(a.K) + " D=" + std::to_string(a.D) + ")");
  if (rn && (!rn->delta || !rn->resid_in || !rn->resid_out || !rn->next_w || rn->resid_in == rn->resid_out))
    throw std::invalid_argument("gemv_qkv_rope: delta, resid_in, resid_out (another buffer) and next_w are required");
  if (!rn && !x) throw std::invalid_argument("gemv_qkv_rope: x or the residual step is required");
  const int C = a.D / 16;
  const dim3 grid((a.NH + 2 * a.KVH) * C);
  launch_k_cluster(qkv_kernel_for(M, a.K, rn != nullptr), grid, kQkvThreads, 0, s, C, a, x, W,
                   rn ? *rn : GemvResidual(), pdl_flags());
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
