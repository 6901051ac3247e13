// vision_gemm.cu: the vision tower's products through cuBLAS (bf16 inputs, float32 accumulation). Unlike
// the text engine's gemm() the output may be bf16: the tower's activations are thousands of rows wide,
// and a float32 output would double the memory traffic of every elementwise step after a product.
#include <string>
#include "vision_kernels.cuh"

namespace g3cuda {

void vision_gemm(cublasHandle_t h, void* out, bool out_bf16, const bf16* x, const bf16* w, int M, int K, int N,
                 cudaStream_t s) {
  if (M <= 0 || N <= 0) return;
  const float alpha = 1.f, beta = 0.f;
  // column-major view: out^T [N, M] = (W as col-major [K, N])^T . x^T [K, M]
  cublasStatus_t st = cublasSetStream(h, s);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, CUDA_R_16BF, K, x, CUDA_R_16BF, K, &beta, out,
                      out_bf16 ? CUDA_R_16BF : CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error("vision_gemm: cublasGemmEx failed with status " + std::to_string((int)st) + " (M=" +
                             std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N) + ")");
}

}  // namespace g3cuda

// ---- cuBLASLt with the bias (and gelu) in the product's epilogue ----
#include <cublasLt.h>
#include <map>
#include <tuple>

namespace g3cuda {

// One product: out [M, N] = x [M, K] . w [N, K]^T + bias (+ gelu), or with accumulate out += that (cuBLASLt's
// C is out itself, beta 1).
// transposed: out^T [N, M] instead (feature-major; no epilogue).
struct LtShape {
  int M, K, N, ep;
  bool out_bf16, accumulate, transposed = false;
  bool operator<(const LtShape& o) const {
    return std::tie(M, K, N, ep, out_bf16, accumulate, transposed) <
           std::tie(o.M, o.K, o.N, o.ep, o.out_bf16, o.accumulate, o.transposed);
  }
};

struct VisionLt {
  cublasLtHandle_t h = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  bool autotune = false;
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo;
  };
  std::map<LtShape, Plan> plans;
};

static void lt_check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("vision_gemm_lt: ") + what + " failed with status " + std::to_string((int)st));
}

VisionLt* vision_lt_create(size_t workspace_bytes, bool autotune) {
  auto* lt = new VisionLt;
  lt->autotune = autotune;
  if (cublasLtCreate(&lt->h) != CUBLAS_STATUS_SUCCESS) {
    delete lt;
    throw std::runtime_error("vision_lt_create: cublasLtCreate failed");
  }
  if (workspace_bytes && cudaMalloc(&lt->ws, workspace_bytes) != cudaSuccess) {
    cudaGetLastError();
    cublasLtDestroy(lt->h);
    delete lt;
    throw std::runtime_error("vision_lt_create: cudaMalloc of the workspace failed");
  }
  lt->ws_bytes = workspace_bytes;
  return lt;
}

void vision_lt_destroy(VisionLt* lt) {
  if (!lt) return;
  for (auto& [k, p] : lt->plans) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.d);
    cublasLtMatmulDescDestroy(p.op);
  }
  if (lt->ws) cudaFree(lt->ws);
  cublasLtDestroy(lt->h);
  delete lt;
}

// The fastest of the heuristic's n candidates for this product, timed on the stream (1 warm-up and 3 timed
// runs each; into a scratch output when the product accumulates into out). 0 while the stream is being
// captured, when the scratch cannot be had, or when no candidate ran.
static int fastest_algo(VisionLt* lt, const LtShape& sh, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                        cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t ld,
                        const cublasLtMatmulHeuristicResult_t* res, int n, void* out, const void* A, const void* B,
                        cudaStream_t s) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) {
    cudaGetLastError();
    return 0;
  }
  void* d = out;
  void* scratch = nullptr;
  if (sh.accumulate) {
    if (cudaMalloc(&scratch, (size_t)sh.M * sh.N * (sh.out_bf16 ? 2 : 4)) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    d = scratch;
  }
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const float alpha = 1.f, beta = sh.accumulate ? 1.f : 0.f;
  int best = -1;  // among the candidates that ran
  float best_ms = 0.f;
  for (int i = 0; i < n; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    auto run = [&] {
      return cublasLtMatmul(lt->h, op, &alpha, A, la, B, lb, &beta, d, ld, d, ld, &res[i].algo, lt->ws, lt->ws_bytes, s);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;
    cudaEventRecord(e0, s);
    for (int r = 0; r < 3; ++r) run();
    cudaEventRecord(e1, s);
    float ms = 0.f;
    if (cudaEventSynchronize(e1) != cudaSuccess || cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    if (best < 0 || ms < best_ms) best = i, best_ms = ms;
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  if (scratch) cudaFree(scratch);
  return best < 0 ? 0 : best;
}

static void lt_matmul(VisionLt* lt, const LtShape& sh, void* out, const bf16* x, const bf16* w, const void* bias,
                      cudaStream_t s) {
  if (sh.M <= 0 || sh.N <= 0) return;
  const void* A = sh.transposed ? (const void*)x : (const void*)w;
  const void* B = sh.transposed ? (const void*)w : (const void*)x;
  auto it = lt->plans.find(sh);
  if (it == lt->plans.end()) {
    // column-major view as vision_gemm: out^T [N, M] = (W as col-major [K, N])^T . x^T [K, M]; the bias is
    // per row of out^T, i.e. per output feature. Transposed: out [M, N] (column-major) = (x as col-major
    // [K, M])^T . W^T [K, N]: the roles of x and W swap.
    VisionLt::Plan p;
    struct Guard {  // frees what was made if a later call throws
      VisionLt::Plan* p;
      ~Guard() {
        if (!p) return;
        if (p->a) cublasLtMatrixLayoutDestroy(p->a);
        if (p->b) cublasLtMatrixLayoutDestroy(p->b);
        if (p->d) cublasLtMatrixLayoutDestroy(p->d);
        if (p->op) cublasLtMatmulDescDestroy(p->op);
      }
    } guard{&p};
    lt_check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const bool has_bias = sh.ep != (int)VisionEpilogue::kNone;
    const cublasLtEpilogue_t e = sh.ep == (int)VisionEpilogue::kGeluBias ? CUBLASLT_EPILOGUE_GELU_BIAS
                                 : has_bias                              ? CUBLASLT_EPILOGUE_BIAS
                                                                         : CUBLASLT_EPILOGUE_DEFAULT;
    const cudaDataType_t bias_type = sh.out_bf16 ? CUDA_R_16BF : CUDA_R_32F;  // cuBLASLt: the bias in D's type
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA");
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB");
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof(e)), "EPILOGUE");
    if (has_bias) {
      lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)),
               "BIAS_DATA_TYPE");
      lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
               "BIAS_POINTER");
    }
    const cudaDataType_t dt = sh.out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const int ma = sh.transposed ? sh.M : sh.N, nb = sh.transposed ? sh.N : sh.M;  // D is ma x nb
    lt_check(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, sh.K, ma, sh.K), "layout A");
    lt_check(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, sh.K, nb, sh.K), "layout B");
    lt_check(cublasLtMatrixLayoutCreate(&p.d, dt, ma, nb, ma), "layout D");
    cublasLtMatmulPreference_t pref = nullptr;
    lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    constexpr int kCandidates = 8;  // the heuristic's best ones, timed when lt->autotune (32: no better, NOTES)
    cublasLtMatmulHeuristicResult_t res[kCandidates] = {};
    int n = 0;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                             &lt->ws_bytes, sizeof(lt->ws_bytes));
    if (st == CUBLAS_STATUS_SUCCESS && sh.accumulate) {
      // out is C and D at once: no split-K (its reductions go through the output; racecheck flagged
      // cuBLASLt's split-K kernel on such a product, bench/gpu/NOTES.md)
      const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
      st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &none, sizeof(none));
    }
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(lt->h, p.op, p.a, p.b, p.d, p.d, pref, lt->autotune ? kCandidates : 1, res,
                                          &n);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || n == 0)
      throw std::runtime_error("vision_gemm_lt: no cuBLASLt algorithm for M=" + std::to_string(sh.M) + " K=" +
                               std::to_string(sh.K) + " N=" + std::to_string(sh.N) + " with this epilogue (status " +
                               std::to_string((int)st) + ")");
    p.algo = res[n > 1 ? fastest_algo(lt, sh, p.op, p.a, p.b, p.d, res, n, out, A, B, s) : 0].algo;
    it = lt->plans.emplace(sh, p).first;
    guard.p = nullptr;  // the plan is the VisionLt's now
  }
  VisionLt::Plan& p = it->second;
  if (sh.ep != (int)VisionEpilogue::kNone)
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
             "BIAS_POINTER");
  const float alpha = 1.f, beta = sh.accumulate ? 1.f : 0.f;
  lt_check(cublasLtMatmul(lt->h, p.op, &alpha, A, p.a, B, p.b, &beta, out, p.d, out, p.d, &p.algo, lt->ws, lt->ws_bytes, s),
           "cublasLtMatmul");
}

void vision_gemm_lt(VisionLt* lt, void* out, bool out_bf16, const bf16* x, const bf16* w, const void* bias,
                    VisionEpilogue ep, int M, int K, int N, cudaStream_t s) {
  lt_matmul(lt, LtShape{M, K, N, (int)ep, out_bf16, false}, out, x, w, bias, s);
}

void vision_gemm_lt_t(VisionLt* lt, bf16* out_t, const bf16* x, const bf16* w, int M, int K, int N, cudaStream_t s) {
  lt_matmul(lt, LtShape{M, K, N, (int)VisionEpilogue::kNone, true, false, true}, out_t, x, w, nullptr, s);
}

void vision_gemm_residual_lt(VisionLt* lt, float* x, const bf16* a, const bf16* w, const float* bias, int M, int K,
                             int N, cudaStream_t s) {
  lt_matmul(lt, LtShape{M, K, N, (int)VisionEpilogue::kBias, false, true}, x, a, w, bias, s);
}
void vision_gemm_residual_lt(VisionLt* lt, bf16* x, const bf16* a, const bf16* w, const bf16* bias, int M, int K,
                             int N, cudaStream_t s) {
  lt_matmul(lt, LtShape{M, K, N, (int)VisionEpilogue::kBias, true, true}, x, a, w, bias, s);
}

}  // namespace g3cuda
