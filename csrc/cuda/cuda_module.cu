// cuda_module.cu: gemma3_native._cuda, the CUDA backend's Python module. For now it reports the
// devices it sees and that cuBLAS starts; the kernels and engine arrive with the CUDA issue.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "gemma3-native CUDA backend";
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n;
  });
  m.def("device_name", [](int i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) throw std::runtime_error("no CUDA device " + std::to_string(i));
    return std::string(p.name);
  });
  m.def("cublas_ok", []() {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return false;
    cublasDestroy(h);
    return true;
  });
}
