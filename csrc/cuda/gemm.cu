// gemm.cu: the products out[M, N] = x[M, K] . W[N, K]^T (float32 out, float32 accumulation).
// Decode-sized bf16 products (M <= 2 on the auto path; up to 8 when asked) use the GEMV kernel below,
// which streams W once with 16-byte loads, several in flight per lane, WPR warps per output row (chosen
// so the grid fills the GPU and each lane has work); the rest go to cuBLAS (bf16 x bf16 -> f32, or plain
// f32 without TF32). gemv_residual: the same GEMV with the residual step before it done by every block.
// A launch may also be given byte ranges to prefetch into L2 at its blocks' end (L2Prefetch, kernels.cuh).
#include <algorithm>
#include <type_traits>
#include "gemv_chunk.cuh"
#include "kernels.cuh"
#include "residual_step.cuh"

namespace g3cuda {

constexpr int kGemvThreads = 256, kGemvUnroll = 4;
// The auto path takes the GEMV up to this many rows: measured on an H100, batch 8 through the GEMV
// (8 activation loads per weight load) ran slower per step than batch 32 through cuBLAS.
constexpr int kGemvAutoMaxM = 2;

// This block's share of an L2Prefetch (kernels.cuh): one bulk prefetch per range its slice overlaps, by one thread.
// Constant indices only (a dynamically indexed parameter array would be copied to local memory by every thread).
__device__ __forceinline__ void l2_prefetch_share(const L2Prefetch& pf) {
#if __CUDA_ARCH__ >= 900
  const long long total = pf.bytes[0] + pf.bytes[1];
  if (total <= 0) return;
  const long long per = ((total + gridDim.x - 1) / gridDim.x + 255) & ~255LL;
  const long long a = (long long)blockIdx.x * per, b = a + per < total ? a + per : total;
  long long off = 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long lo = a > off ? a : off, hi = b < off + pf.bytes[r] ? b : off + pf.bytes[r];
    if (hi > lo)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(pf.p[r] + (lo - off)), "r"((unsigned)(hi - lo))
                   : "memory");
    off += pf.bytes[r];
  }
#endif
}

// GEGLU = false: out[m, n] = x[m] . W[n] (float32).  GEGLU = true (W = [gate; up], N = F rows of
// each): act[m, n] = gelu_tanh(x[m] . W[n]) * (x[m] . W[F + n]) in bf16: the GeGLU fused into the
// stacked product, so the 2F-wide product never goes to memory.
// pre: the first round of weight loads is issued before the wait for the kernel before (weights are
// constant), so at batch 1 a block whose rows fit in one round has all its bytes in flight while the
// previous kernel finishes, and after the wait only x is read.
// NORM: x is not read but made by every block from the residual step (GemvResidual, kernels.cuh) with
// residual_rmsnorm_kernel's arithmetic and thread layout (residual_step.cuh: 256 threads, element
// i = thread + 256 k, the same double sums), so the same bf16 x; block 0 writes the new residual row. Its norm weights and old
// residual row come before the wait too (the row after it with kPdlResidLate, common.cuh). Its grid is at most one wave of blocks, each taking row groups
// blockIdx.x, + gridDim.x, ...: every block pays the residual step once, whatever N is. Each block loads its
// next row group's first round of weights before it reduces and stores the current one, so that its loads
// stay in flight across groups (the same bits; 1B's gate_up, 4.4 groups a block: a decode step 2-6 % faster on
// an H100, bench/gpu/NOTES.md session 14).
template <int M, bool GEGLU, bool NORM, int P = 1>
__global__ void __launch_bounds__(kGemvThreads) gemv_bf16_kernel(void* out_, const bf16* __restrict__ x,
                                                                  const bf16* __restrict__ W, int N, int K, int wpr,
                                                                  int pdl, GemvResidual rn, L2Prefetch pf) {
  G3_PDL_TRIGGER_EARLY(pdl);
  const bool pre = pdl & kPdlPrologue;
  constexpr int R = GEGLU ? 2 : 1;  // weight rows per output
  __shared__ float red[kGemvThreads / 32][R][M];
  __shared__ __align__(16) bf16 xs[NORM ? M * kGemvThreads * P : 8];
  __shared__ double sh[NORM ? 33 : 1];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows_per_block = (kGemvThreads / 32) / wpr;
  const int groups = (N + rows_per_block - 1) / rows_per_block;
  int grp = blockIdx.x;
  int n = grp * rows_per_block + warp / wpr;
  const int wi = warp % wpr;
  const int K8 = K / 8;
  const int stride = wpr * 32;
  uint4 wv[R][kGemvUnroll];
  auto load_w_row = [&](int row, int c0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4* wr = reinterpret_cast<const uint4*>(W + (int64_t)(row + r * N) * K);
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int c = c0 + u * stride;
        wv[r][u] = c < K8 ? __ldcs(wr + c) : make_uint4(0, 0, 0, 0);  // streamed once: do not keep in caches
      }
    }
  };
  auto load_w = [&](int c0) { load_w_row(n, c0); };
  const int cfirst = wi * 32 + lane;
  bool have = pre && n < N;
  if (have) load_w(cfirst);
  FusedResidualStep<M, NORM ? P : 1, kGemvThreads> res;
  if constexpr (NORM) {
    res.load_before_wait(rn, K, pdl);
  }
  G3_PDL_WAIT_FLAGS(pdl);
  if constexpr (NORM) {
    res.load_after_wait(rn, K, pdl);
    res.make_x(xs, rn, K, sh);
  }
  for (;;) {  // row groups: one per block, or (NORM) blockIdx.x, + gridDim.x, ...
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    if (n < N) {
      for (int c0 = cfirst; c0 < K8; c0 += stride * kGemvUnroll) {
        if (!have) load_w(c0);
        have = false;
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
          const int c = c0 + u * stride;
          if (c < K8) gemv_chunk_fma<M, R, kGemvUnroll, NORM>(acc, wv, u, NORM ? xs : x, K, c);
        }
      }
    }
    // NORM: the next row group's first round of weights in flight while this one is reduced and stored
    // (wv is free once the last chunk above is consumed)
    const int next_grp = grp + gridDim.x;
    const int next_n = next_grp * rows_per_block + warp / wpr;
    if (NORM && next_grp < groups && next_n < N) {
      load_w_row(next_n, cfirst);
      have = true;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (wpr > 1) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < M; ++m) red[warp][r][m] = acc[r][m];
      }
      __syncthreads();
      if (wi == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float t = 0.f;
            for (int w = 0; w < wpr; ++w) t += red[warp + w][r][m];
            acc[r][m] = t;
          }
      }
    }
    if (lane == 0 && wi == 0 && n < N) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if constexpr (GEGLU)
          static_cast<bf16*>(out_)[(int64_t)m * N + n] = __float2bfloat16_rn(gelu_tanh(acc[0][m]) * acc[1][m]);
        else
          static_cast<float*>(out_)[(int64_t)m * N + n] = acc[0][m];
      }
    }
    if (!NORM) break;  // a group per block
    grp = next_grp;
    if (grp >= groups) break;
    n = next_n;
    if (wpr > 1) __syncthreads();  // red is reused
  }
  // at the end: the block's own loads are done, so the prefetch takes HBM time the product no longer uses
  if (threadIdx.x == 0) l2_prefetch_share(pf);
}

L2Prefetch& gemv_next_l2_prefetch() {
  static L2Prefetch p;
  return p;
}

int& gemv_mode() {
  static int m = 2;
  return m;
}

bool gemv_supported(bool is_bf16, int M, int K) { return is_bf16 && M >= 1 && M <= 8 && K % 8 == 0; }

bool gemv_residual_supported(bool is_bf16, int M, int K) {
  return gemv_supported(is_bf16, M, K) && M <= kGemvAutoMaxM && K <= kGemvThreads * kGemvResidualPer;
}

static int num_sms();
// Warps per output row. resident: how many blocks of the kernel that will run are resident at once (0: unknown).
static int gemv_wpr(int N, int K, int resident = 0) {
  const int K8 = K / 8;
  int wpr = 1;
  if (gemv_mode() >= 1) {  // more warps per row while each lane keeps >= 2 loads
    while (wpr < 8 && K8 >= wpr * 2 * 64) wpr *= 2;
    while (wpr < 8 && (int64_t)N * wpr < 132 * 16 && K8 >= wpr * 64) wpr *= 2;
    // 2 (default): a grid of one to four waves of blocks ends with a partial wave whose few blocks stream
    // alone; fewer warps per row (more rows per block) where that makes it one wave and each lane keeps a
    // load. Measured on an H100 (bench/gpu/NOTES.md, session 11; there 6 blocks of the plain kernel fit an SM,
    // 4 of the GeGLU one), a decode step: 1B 1.143 -> 1.128 ms (its down product: 4 warps a row instead of 8);
    // 4B 3.184 -> 3.119 ms up to three waves (its o product 2 instead of 4, its qkv product 1 instead of 4), and
    // 3.186 -> 3.142 ms on another machine from three to four (its down product 2 instead of 8); at 1B on a
    // third machine it was neutral (1.150 against 1.147 ms with the old rule, bench_e2e). Longer grids
    // (gate_up, the LM head) cannot become one wave; shapes beyond 4B were not measured, hence the limit.
    if (gemv_mode() == 2 && resident > 0) {
      auto blocks = [&](int w) { return ((int64_t)N + (8 / w) - 1) / (8 / w); };
      int w = wpr;
      while (w > 1 && blocks(w) > resident && blocks(w) < 4 * (int64_t)resident && K8 >= (w / 2) * 32) w /= 2;
      if (blocks(w) <= resident) wpr = w;
    }
  } else {
    // one warp per output row when there are rows enough to fill the GPU (no cross-warp reduction,
    // longer streams per lane); more warps per row only for short N, while each lane keeps >= 1 load
    while (wpr < 8 && (int64_t)N * wpr < 132 * 16 && K8 >= wpr * 2 * 32) wpr *= 2;
  }
  return wpr;
}

// The NORM kernel for (M, GEGLU, K) and how many of its blocks one SM holds.
struct NormKernel {
  void (*k)(void*, const bf16*, const bf16*, int, int, int, int, GemvResidual, L2Prefetch);
  int per_sm;
};
template <bool GEGLU>
static NormKernel norm_kernel(int M, int K) {
  static NormKernel cache[2][2] = {};
  const int pi = K <= kGemvThreads * 5 ? 0 : 1;  // 5 or 10 residual elements per thread
  NormKernel& nk = cache[M - 1][pi];
  if (!nk.k) {
    if (M == 1) nk.k = pi == 0 ? gemv_bf16_kernel<1, GEGLU, true, 5> : gemv_bf16_kernel<1, GEGLU, true, 10>;
    else nk.k = pi == 0 ? gemv_bf16_kernel<2, GEGLU, true, 5> : gemv_bf16_kernel<2, GEGLU, true, 10>;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nk.per_sm, nk.k, kGemvThreads, 0));
  }
  return nk;
}
static int num_sms() {
  static int n = 0;
  if (!n) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  }
  return n;
}

// blocks of the fused kernel resident at once (its grid: at most that many, looping over the row groups)
static int norm_resident(bool geglu, int M, int K) {
  return (geglu ? norm_kernel<true>(M, K).per_sm : norm_kernel<false>(M, K).per_sm) * num_sms();
}

// blocks of the plain GEMV kernel resident at once (for gemv_wpr's wave rule)
template <int M, bool GEGLU>
static int plain_resident() {
  static int n = -1;
  if (n < 0) {
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_bf16_kernel<M, GEGLU, false>, kGemvThreads, 0));
    n = per_sm * num_sms();
  }
  return n;
}

GemvShape gemv_shape(int M, int N, int K, bool geglu, bool fused) {
  GemvShape g;
  // the warps per row are the plain kernel's even for the fused one, so that the fused product keeps the
  // plain GEMV's summation order (its bits: test_gemv_residual)
  int plain = 0;  // M > 2 (forced GEMV path): no wave rule (the decode sizes it was measured at are 1-2)
  if (M == 1) plain = geglu ? plain_resident<1, true>() : plain_resident<1, false>();
  else if (M == 2) plain = geglu ? plain_resident<2, true>() : plain_resident<2, false>();
  g.wpr = gemv_wpr(N, K, plain);
  g.rows_per_block = (kGemvThreads / 32) / g.wpr;
  g.blocks = (N + g.rows_per_block - 1) / g.rows_per_block;
  g.resident = fused ? (gemv_residual_supported(true, M, K) ? norm_resident(geglu, M, K) : 0) : plain;
  return g;
}

bool gemv_residual_one_wave(int M, int K, int N, bool geglu) {
  if (!gemv_residual_supported(true, M, K)) return false;
  const GemvShape g = gemv_shape(M, N, K, geglu, true);
  return g.blocks <= g.resident;
}

bool gemv_few_waves(int M, int K, int N, bool geglu) {
  if (!gemv_supported(true, M, K) || M > kGemvAutoMaxM) return false;
  const GemvShape g = gemv_shape(M, N, K, geglu, false);
  return g.blocks > g.resident && g.blocks <= 4 * g.resident;
}

template <bool GEGLU>
static void gemv_bf16(void* out, const bf16* x, const bf16* W, int M, int N, int K, cudaStream_t s,
                      const GemvResidual* rn = nullptr) {
  const GemvShape g = gemv_shape(M, N, K, GEGLU, rn != nullptr);
  const int wpr = g.wpr, blocks = g.blocks;
  const int pdl = pdl_flags();
  const L2Prefetch pf = gemv_next_l2_prefetch();
  gemv_next_l2_prefetch() = L2Prefetch();
  if (rn) {
    if (!gemv_residual_supported(true, M, K))
      throw std::invalid_argument("gemv_residual: needs M <= 2 and K <= " + std::to_string(kGemvThreads * kGemvResidualPer) +
                                  ", K % 8 == 0 (M=" + std::to_string(M) + " K=" + std::to_string(K) + ")");
    if (!rn->delta || !rn->resid_in || !rn->resid_out || !rn->next_w || rn->resid_in == rn->resid_out)
      throw std::invalid_argument("gemv_residual: delta, resid_in, resid_out (another buffer) and next_w are required");
    const NormKernel nk = norm_kernel<GEGLU>(M, K);
    launch_k(nk.k, std::min(blocks, std::max(1, nk.per_sm) * num_sms()), kGemvThreads, 0, s, out, x, W, N, K, wpr, pdl,
             *rn, pf);
    CUDA_LAUNCH_CHECK();
    return;
  }
  switch (M) {
#define G3_GEMV(MM)                                                                                                 \
  case MM:                                                                                                          \
    launch_k(gemv_bf16_kernel<MM, GEGLU, false>, blocks, kGemvThreads, 0, s, out, x, W, N, K, wpr, pdl, GemvResidual(), \
             pf);                                                                                                   \
    break;
    G3_GEMV(1) G3_GEMV(2) G3_GEMV(3) G3_GEMV(4) G3_GEMV(5) G3_GEMV(6) G3_GEMV(7) G3_GEMV(8)
#undef G3_GEMV
    default: throw std::invalid_argument("gemv: M must be 1..8");
  }
  CUDA_LAUNCH_CHECK();
}

void gemv_residual(float* out, const GemvResidual& rn, const bf16* W, int M, int K, int N, cudaStream_t s) {
  if (M <= 0) return;
  gemv_bf16<false>(out, nullptr, W, M, N, K, s, &rn);
}
void gemv_residual_geglu(bf16* act, const GemvResidual& rn, const bf16* W, int M, int K, int F, cudaStream_t s) {
  if (M <= 0) return;
  gemv_bf16<true>(act, nullptr, W, M, F, K, s, &rn);
}

static const char* cublas_status(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "alloc failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "arch mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
  }
}

void gemm(cublasHandle_t h, float* out, const void* x, const void* w, bool is_bf16, int M, int K, int N, int path,
          cudaStream_t s) {
  if (M <= 0) return;
  if (path == 1 && !gemv_supported(is_bf16, M, K)) throw std::invalid_argument("gemm: GEMV path not applicable");
  if (path == 1 || (path == 0 && M <= kGemvAutoMaxM && gemv_supported(is_bf16, M, K))) {
    gemv_bf16<false>(out, static_cast<const bf16*>(x), static_cast<const bf16*>(w), M, N, K, s);
    return;
  }
  // column-major view: out^T [N, M] = W^T(op T of the [K, N] col-major W) . x^T [K, M]
  const float alpha = 1.f, beta = 0.f;
  cublasStatus_t st = cublasSetStream(h, s);
  if (st == CUBLAS_STATUS_SUCCESS) {
    const cudaDataType_t ab = is_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, ab, K, x, ab, K, &beta, out, CUDA_R_32F, N,
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLAS GemmEx failed: ") + cublas_status(st) + " (M=" + std::to_string(M) +
                             " K=" + std::to_string(K) + " N=" + std::to_string(N) + ")");
}

}  // namespace g3cuda

namespace g3cuda {

template <typename T>
void gemm_geglu(cublasHandle_t h, T* act, float* gu, const T* x, const T* w, int M, int K, int F, int path,
                cudaStream_t s) {
  constexpr bool bf = std::is_same<T, bf16>::value;
  if constexpr (bf) {
    if (path == 1 || (path == 0 && M <= kGemvAutoMaxM && gemv_supported(true, M, K))) {
      gemv_bf16<true>(act, x, w, M, F, K, s);
      return;
    }
  }
  gemm(h, gu, x, w, bf, M, K, 2 * F, path == 1 ? 0 : path, s);
  geglu<T>(act, gu, M, F, s);
}

template void gemm_geglu<float>(cublasHandle_t, float*, float*, const float*, const float*, int, int, int, int,
                                cudaStream_t);
template void gemm_geglu<bf16>(cublasHandle_t, bf16*, float*, const bf16*, const bf16*, int, int, int, int,
                               cudaStream_t);

}  // namespace g3cuda
