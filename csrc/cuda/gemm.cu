// gemm.cu: the products out[M, N] = x[M, K] . W[N, K]^T (float32 out, float32 accumulation).
// Decode-sized bf16 products (M <= 8) use the GEMV kernel below, which streams W once with 16-byte
// loads, several in flight per lane, WPR warps per output row (chosen so the grid fills the GPU and
// each lane has work); the rest go to cuBLAS (bf16 x bf16 -> f32, or plain f32 without TF32).
#include "kernels.cuh"

namespace g3cuda {

constexpr int kGemvThreads = 256, kGemvUnroll = 4;

__device__ __forceinline__ void bf16x8_to_f(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(p[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <int M>
__global__ void __launch_bounds__(kGemvThreads) gemv_bf16_kernel(float* out, const bf16* __restrict__ x,
                                                                  const bf16* __restrict__ W, int N, int K, int wpr) {
  __shared__ float red[kGemvThreads / 32][M];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows_per_block = (kGemvThreads / 32) / wpr;
  const int n = blockIdx.x * rows_per_block + warp / wpr;
  const int wi = warp % wpr;
  const int K8 = K / 8;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  if (n < N) {
    const uint4* wr = reinterpret_cast<const uint4*>(W + (int64_t)n * K);
    const int stride = wpr * 32;
    for (int c0 = wi * 32 + lane; c0 < K8; c0 += stride * kGemvUnroll) {
      uint4 wv[kGemvUnroll];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int c = c0 + u * stride;
        wv[u] = c < K8 ? __ldcs(wr + c) : make_uint4(0, 0, 0, 0);  // streamed once: do not keep in L1/L2
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int c = c0 + u * stride;
        if (c < K8) {
          float wf[8];
          bf16x8_to_f(wv[u], wf);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)m * K) + c);
            float xf[8];
            bf16x8_to_f(xv, xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[m] = fmaf(wf[i], xf[i], acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if (wpr == 1) {
    if (lane == 0 && n < N) {
#pragma unroll
      for (int m = 0; m < M; ++m) out[(int64_t)m * N + n] = acc[m];
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) red[warp][m] = acc[m];
  }
  __syncthreads();
  if (wi == 0 && lane < M && n < N) {
    float s = 0.f;
    for (int w = 0; w < wpr; ++w) s += red[warp + w][lane];
    out[(int64_t)lane * N + n] = s;
  }
}

bool gemv_supported(bool is_bf16, int M, int K) { return is_bf16 && M >= 1 && M <= 8 && K % 8 == 0; }

static void gemv_bf16(float* out, const bf16* x, const bf16* W, int M, int N, int K, cudaStream_t s) {
  const int K8 = K / 8;
  int wpr = 1;
  while (wpr < 8 && K8 >= wpr * 2 * 64) wpr *= 2;                   // each lane >= ~2 loads
  while (wpr < 8 && (int64_t)N * wpr < 132 * 16 && K8 >= wpr * 64) wpr *= 2;  // fill the GPU on short N
  const int rows_per_block = (kGemvThreads / 32) / wpr;
  const int blocks = (N + rows_per_block - 1) / rows_per_block;
  switch (M) {
#define G3_GEMV(MM) \
  case MM: gemv_bf16_kernel<MM><<<blocks, kGemvThreads, 0, s>>>(out, x, W, N, K, wpr); break;
    G3_GEMV(1) G3_GEMV(2) G3_GEMV(3) G3_GEMV(4) G3_GEMV(5) G3_GEMV(6) G3_GEMV(7) G3_GEMV(8)
#undef G3_GEMV
    default: throw std::invalid_argument("gemv: M must be 1..8");
  }
  CUDA_LAUNCH_CHECK();
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
  if (path == 1 || (path == 0 && gemv_supported(is_bf16, M, K))) {
    gemv_bf16(out, static_cast<const bf16*>(x), static_cast<const bf16*>(w), M, N, K, s);
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
