// vision_engine.h: the Gemma 3 vision encoder (SigLIP tower + multimodal projector) on one GPU, with the
// Python interface of VisionEncoderCpu (same weight names, set_weight, encode = tower, forward = tower +
// projector). bf16 only: matrices, activations and (by default, as in transformers) the residual stream in
// bf16, every accumulation and norm statistic in float32 (a float32 checkpoint's tower stays on the CPU:
// model.py). The host copy of the weights lives in a VisionEncoderCpu (its name map and checks); the first
// run (or finalize()) uploads it once. All
// activations are preallocated for max_images images; more images run in chunks of that many.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <string>
#include <vector>
#include "config.h"
#include "vision_cpu.h"

namespace g3cuda {
struct VisionLt;
}

namespace g3 {

class CudaVisionEncoder {
 public:
  CudaVisionEncoder(const VisionConfig& cfg, DType dtype, int max_images);
  ~CudaVisionEncoder();
  CudaVisionEncoder(const CudaVisionEncoder&) = delete;
  CudaVisionEncoder& operator=(const CudaVisionEncoder&) = delete;

  const VisionConfig& config() const { return cfg_; }
  DType dtype() const { return DType::BF16; }
  int max_images() const { return max_images_; }
  VisionEncoderCpu& host() { return host_; }
  void set(const std::string& name, const void* data, DType dt, const std::vector<int64_t>& shape) {
    host_.set(name, data, dt, shape);
    dirty_ = true;
  }
  void finalize();  // uploads the weights now (else the first run does)
  size_t device_bytes() const { return device_bytes_; }
  // The cuBLASLt epilogue paths (on by default on compute capability 9.0, where they were measured; the
  // plain cuBLAS products and the elementwise passes otherwise). Either can be switched at any time.
  bool fc1_epilogue() const { return fc1_epilogue_; }
  void set_fc1_epilogue(bool on);
  bool residual_epilogue() const { return residual_epilogue_; }
  void set_residual_epilogue(bool on);
  // Off: the epilogue products take cuBLASLt's heuristic's first algorithm, the others cublasGemmEx's. On:
  // every product goes through cuBLASLt and takes the fastest of the heuristic's best 8, timed on first use
  // per shape (as cudnn.benchmark: the choice may differ between processes). Switching drops the plans.
  bool lt_autotune() const { return lt_autotune_; }
  void set_lt_autotune(bool on);
  // On (the default where the wgmma attention runs): the q/k/v product is written transposed and the wgmma
  // attention reads it as it is (vision_attention_wgmma_t), with no split pass; taken for patch counts that
  // are a multiple of 8 (else the split). Setting it on elsewhere throws.
  bool qkv_transposed() const { return qkv_transposed_; }
  void set_qkv_transposed(bool on);
  // The residual stream in bf16, as transformers' bf16 tower keeps it (each residual sum rounded once to bf16,
  // the LayerNorms reading the rounded values), instead of float32: half the traffic of the LayerNorm passes
  // and of the residual epilogues. The post-LayerNorm's output stays float32.
  bool residual_bf16() const { return residual_bf16_; }
  void set_residual_bf16(bool on);
  // The o product's bias and residual add in its cuBLASLt epilogue too (as fc2's with residual_epilogue), so
  // that the LayerNorm after it only normalises.
  bool o_residual_epilogue() const { return o_residual_epilogue_; }
  void set_o_residual_epilogue(bool on);

  // Host pointers: pixels [n, C, S, S] -> tower output [n, patches, hidden] (encode) or projected
  // image embeddings [n, mm_tokens_per_image, text_hidden] (forward), float32.
  void encode(const float* pixels, int n, float* out) { run_host(pixels, n, out, false); }
  void forward(const float* pixels, int n, float* out) { run_host(pixels, n, out, true); }
  // Device pointers (benchmarks: no host copies in the timing). Waits for the device to be idle first
  // (inputs written on other streams), returns when done.
  void run_device(const float* d_pixels, int n, float* d_out, bool project);

  // Opt-in per-stage timing (benchmarks): runs one chunk (n <= max_images, device pointers as run_device)
  // warmup + iters times with cudaEvents recorded between the stages on the encoder's stream (events
  // created once, on the first call; the normal path records nothing). Per-layer stages are summed over
  // the layers. Each stage's ms is the median over iters; total_ms the median first-to-last event time
  // (the events themselves add a little: PDL overlap between kernels is lost at every event).
  struct StageTime {
    std::string name;
    double ms = 0, flops = 0, bytes = 0;  // flops: products and attention (from the shapes), else 0;
                                          // bytes: the minimum global traffic of the elementwise stages, else 0
  };
  struct StageProfile {
    std::vector<StageTime> stages;
    double total_ms = 0;
    int n = 0, iters = 0;
  };
  StageProfile profile_stages(const float* d_pixels, int n, float* d_out, bool project, int iters, int warmup = 2);

 private:
  void* dalloc(size_t bytes);
  void ensure_lt();
  void upload();
  void run_chunk(const float* d_pixels, int n, float* d_out, bool project);  // n <= max_images, on stream_
  template <typename X>
  void tower(X* x, const float* d_pixels, int n);  // patch embedding .. post-LayerNorm (into x_)
  void run_host(const float* pixels, int n, float* out, bool project);
  void mark(int stage) {  // profiling only: the time since the previous mark belongs to `stage`
    if (!prof_on_) return;
    prof_mark(stage);
  }
  void prof_mark(int stage);

  struct DevLayer {
    __nv_bfloat16 *qkv = nullptr, *o = nullptr, *fc1 = nullptr, *fc2 = nullptr;
    float *ln1_w = nullptr, *ln1_b = nullptr, *qkv_b = nullptr, *o_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr,
          *fc1_b = nullptr, *fc2_b = nullptr;
    __nv_bfloat16 *fc1_b16 = nullptr, *o_b16 = nullptr, *fc2_b16 = nullptr;  // bf16 copies for the epilogues
  };

  VisionConfig cfg_;
  int max_images_;
  VisionEncoderCpu host_;
  bool dirty_ = true;
  size_t device_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  g3cuda::VisionLt* lt_ = nullptr;  // cuBLASLt plans with epilogues (fc1 + bias + gelu, fc2 + residual)
  bool fc1_epilogue_ = false;       // fc1's bias and gelu in its product's epilogue
  bool residual_epilogue_ = false;  // fc2: x += product + bias in float32 in the epilogue
  bool lt_autotune_ = false;
  bool qkv_transposed_ = false;  // the q/k/v product feature-major, read by the attention directly
  bool residual_bf16_ = false;
  bool o_residual_epilogue_ = false;
  std::vector<void*> allocs_;
  // profiling (profile_stages): an event per stage boundary of one chunk, the stage each one closes
  bool prof_on_ = false;
  std::vector<cudaEvent_t> prof_ev_;
  std::vector<int> prof_stage_;
  size_t prof_n_ = 0;
  // weights
  __nv_bfloat16 *patch_w_ = nullptr, *proj_w_ = nullptr;
  float *patch_b_ = nullptr, *pos_ = nullptr, *post_w_ = nullptr, *post_b_ = nullptr, *soft_w_ = nullptr;
  std::vector<DevLayer> dl_;
  // activations (max_images images)
  float *pix_ = nullptr, *x_ = nullptr, *out_ = nullptr;
  __nv_bfloat16 *xn_ = nullptr, *big_ = nullptr, *qh_ = nullptr, *attn_ = nullptr;
  __nv_bfloat16* d_ = nullptr;  // a product's output before its residual add (without the epilogues), on first need
  __nv_bfloat16* x16_ = nullptr;  // the bf16 residual stream (residual_bf16), allocated when first set
};

}  // namespace g3
