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
