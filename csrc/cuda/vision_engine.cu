// vision_engine.cu: see vision_engine.h. One chunk of n images (R = n * N rows), on one stream:
//   pixels -> vision_patch_embed -> x (bf16, or f32 with residual_bf16() off);  xn = LN1_0(x)
//   per layer: qkv = xn.Wqkv -> split + bias -> attention -> d = a.Wo;  xn = LN2(x += d + bo)
//              h = gelu(xn.W1 + b1);  d = h.W2;  xn = LN1_{l+1}(x += d + b2)  (last layer: post-LN into x, f32)
//   on compute capability 9.0 (each settable: qkv_transposed(), fc1_epilogue(), residual_epilogue()):
//     qkv^T = (xn.Wqkv)^T -> attention reads it directly (no split pass; q, v biases inside the attention);
//     h = gelu(xn.W1 + b1) in fc1's epilogue (no gelu pass);
//     x += h.W2 + b2 in fc2's epilogue, in float32 (the LayerNorm pass after it then only normalises).
//   residual_bf16(): the residual stream x in bf16 (x16_) instead of float32; o_residual_epilogue(): x += a.Wo + bo
//   in the o product's epilogue too.
//   forward only: pool + soft-embedding RMSNorm -> projection (f32 out).
#include "cuda/vision_engine.h"
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include "cuda/vision_kernels.cuh"

namespace g3 {
using namespace g3cuda;

namespace {
// profile_stages: the stages of one chunk, in run order (per-layer ones summed over the layers)
enum VisionStage {
  kStPatch, kStLn1First, kStQkv, kStQkvSplit, kStAttn, kStQkvT, kStAttnT, kStO, kStResLn2, kStOResid, kStLn2, kStFc1,
  kStGelu, kStFc1Gelu, kStFc2, kStResLn1, kStPostLn, kStFc2Resid, kStLn1, kStPostLnOnly, kStPool, kStProj, kStCopyOut,
  kNumStages
};
const char* const kStageNames[kNumStages] = {
    "patch_embed (im2col + gemm + bias + pos)",
    "layernorm1 (layer 0; later ones fused below)",
    "qkv gemm",
    "qkv bias + split + pad",
    "attention",
    "qkv gemm (transposed output)",
    "attention (on the transposed qkv, biases inside)",
    "o gemm",
    "o bias + residual + layernorm2",
    "o gemm + bias + residual (epilogue)",
    "layernorm2",
    "fc1 gemm",
    "fc1 bias + gelu",
    "fc1 gemm + bias + gelu (epilogue)",
    "fc2 gemm",
    "fc2 bias + residual + next layernorm1",
    "fc2 bias + residual + post-layernorm (last layer)",
    "fc2 gemm + bias + residual (epilogue)",
    "next layernorm1",
    "post-layernorm (last layer)",
    "pool + soft-emb norm",
    "projector gemm",
    "copy out (tower output)",
};
double median_of(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t k = v.size() / 2;
  return v.size() % 2 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}
}  // namespace

constexpr size_t kLtWorkspace = 32u << 20;  // cuBLASLt's workspace (the epilogue path)

static DType require_bf16(DType d) {
  if (d != DType::BF16)
    throw std::invalid_argument(
        "CudaVisionEncoder: dtype must be 'bfloat16' (a float32 vision tower runs on the CPU: VisionEncoderCpu)");
  return d;
}

CudaVisionEncoder::CudaVisionEncoder(const VisionConfig& cfg, DType dtype, int max_images)
    : cfg_(cfg), max_images_(max_images), host_(cfg, require_bf16(dtype)) {
  if (max_images < 1) throw std::invalid_argument("max_images must be >= 1, got " + std::to_string(max_images));
  const int D = cfg.head_dim();
  if (D > kVisionDP || D % 2)
    throw std::invalid_argument("CudaVisionEncoder: head_dim must be even and <= 80, got " + std::to_string(D));
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    cudaGetLastError();
    throw std::runtime_error("CudaVisionEncoder: no CUDA device");
  }
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("CudaVisionEncoder: cublasCreate failed");
  cublasSetStream(cublas_, stream_);
  // The cuBLASLt epilogue paths (fc1 + bias + gelu, fc2 and o + bias + residual) instead of a pass over the
  // product or its traffic, and every product's algorithm timed: measured on the H100 only, so elsewhere
  // the cuBLAS products and passes.
  if (device_cc() == 90) {
    lt_autotune_ = true;  // before the VisionLt is made
    set_fc1_epilogue(true);
    set_residual_epilogue(true);
    set_o_residual_epilogue(true);
  }
  if (vision_attention_wgmma_available()) set_qkv_transposed(true);
  const int64_t m = max_images, N = cfg.num_patches(), H = cfg.hidden_size, I = cfg.intermediate_size;
  const int64_t R = m * N, S = cfg.image_size, C = cfg.num_channels;
  const int64_t T = cfg.mm_tokens_per_image, Ht = cfg.text_hidden_size;
  pix_ = static_cast<float*>(dalloc((size_t)(m * C * S * S) * 4));
  x_ = static_cast<float*>(dalloc((size_t)(R * H) * 4));
  out_ = static_cast<float*>(dalloc((size_t)(m * T * std::max<int64_t>(Ht, 1)) * 4));
  xn_ = static_cast<bf16*>(dalloc((size_t)(R * H) * 2));
  const int64_t patch_ld = vision_patch_ld(cfg.num_channels, cfg.patch_size);  // im2col rows, padded
  big_ = static_cast<bf16*>(dalloc((size_t)(R * std::max({3 * H, I, patch_ld})) * 2));
  attn_ = static_cast<bf16*>(dalloc((size_t)(R * H) * 2));
  // transformers' bf16 tower keeps its residual stream in bf16: the same precision at half the residual
  // traffic of float32 (on every device: it removes bytes, it does not pick an algorithm)
  set_residual_bf16(true);
}

CudaVisionEncoder::~CudaVisionEncoder() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (cudaEvent_t e : prof_ev_) cudaEventDestroy(e);
  for (void* p : allocs_) cudaFree(p);
  if (cublas_) cublasDestroy(cublas_);
  vision_lt_destroy(lt_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaVisionEncoder::ensure_lt() {
  if (lt_) return;
  lt_ = vision_lt_create(kLtWorkspace, lt_autotune_);
  device_bytes_ += kLtWorkspace;
}

void CudaVisionEncoder::set_lt_autotune(bool on) {
  if (on == lt_autotune_) return;
  if (on && !lt_) {
    lt_autotune_ = true;
    ensure_lt();
    return;
  }
  lt_autotune_ = on;
  if (!lt_) return;
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  vision_lt_destroy(lt_);  // its plans were chosen the other way
  lt_ = nullptr;
  device_bytes_ -= kLtWorkspace;
  ensure_lt();
}

void CudaVisionEncoder::set_fc1_epilogue(bool on) {
  if (on) ensure_lt();
  fc1_epilogue_ = on;
}

void CudaVisionEncoder::set_qkv_transposed(bool on) {
  if (on && !vision_attention_wgmma_available())
    throw std::invalid_argument(
        "qkv_transposed: the attention on the transposed q/k/v product needs the wgmma kernel (compute capability "
        "9.0, a build with sm_90a)");
  if (on) ensure_lt();
  qkv_transposed_ = on;
}

void CudaVisionEncoder::set_residual_epilogue(bool on) {
  if (on) ensure_lt();
  residual_epilogue_ = on;
}

void CudaVisionEncoder::set_o_residual_epilogue(bool on) {
  if (on) ensure_lt();
  o_residual_epilogue_ = on;
}

void CudaVisionEncoder::set_residual_bf16(bool on) {
  if (on && !x16_) x16_ = static_cast<bf16*>(dalloc((size_t)max_images_ * cfg_.num_patches() * cfg_.hidden_size * 2));
  residual_bf16_ = on;
}

void* CudaVisionEncoder::dalloc(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
  allocs_.push_back(p);
  device_bytes_ += bytes;
  return p;
}

void CudaVisionEncoder::finalize() {
  host_.require_complete();
  if (dirty_) upload();
}

void CudaVisionEncoder::upload() {
  auto mat = [&](bf16*& dst, const WeightView& w) {
    const size_t bytes = (size_t)(w.rows * w.cols) * 2;  // the host store is bf16 (constructor)
    if (!dst) dst = static_cast<bf16*>(dalloc(bytes));
    CUDA_CHECK(cudaMemcpy(dst, w.data, bytes, cudaMemcpyHostToDevice));
  };
  auto vec = [&](float*& dst, const float* src, int64_t n) {
    if (!dst) dst = static_cast<float*>(dalloc((size_t)n * 4));
    CUDA_CHECK(cudaMemcpy(dst, src, (size_t)n * 4, cudaMemcpyHostToDevice));
  };
  auto vec16 = [&](bf16*& dst, const float* src, int64_t n) {
    std::vector<bf16> h((size_t)n);
    for (int64_t i = 0; i < n; ++i) h[i] = __float2bfloat16_rn(src[i]);
    if (!dst) dst = static_cast<bf16*>(dalloc((size_t)n * 2));
    CUDA_CHECK(cudaMemcpy(dst, h.data(), (size_t)n * 2, cudaMemcpyHostToDevice));
  };
  const int64_t H = cfg_.hidden_size, I = cfg_.intermediate_size;
  const VisionEncoderCpu::GlobalView gv = host_.global_view();
  {  // the conv weight [H, C*p*p] with its rows zero-padded to vision_patch_ld (vision_patch_embed)
    const int64_t pd = gv.patch_w.cols, ld = vision_patch_ld(cfg_.num_channels, cfg_.patch_size);
    if (!patch_w_) patch_w_ = static_cast<bf16*>(dalloc((size_t)(H * ld) * 2));
    CUDA_CHECK(cudaMemset(patch_w_, 0, (size_t)(H * ld) * 2));
    CUDA_CHECK(cudaMemcpy2D(patch_w_, (size_t)ld * 2, gv.patch_w.data, (size_t)pd * 2, (size_t)pd * 2, (size_t)H,
                            cudaMemcpyHostToDevice));
  }
  mat(proj_w_, gv.proj_w);
  vec(patch_b_, gv.patch_b, H);
  vec(pos_, gv.pos, (int64_t)cfg_.num_patches() * H);
  vec(post_w_, gv.post_w, H);
  vec(post_b_, gv.post_b, H);
  vec(soft_w_, gv.soft_norm_w, H);
  dl_.resize(cfg_.num_layers);
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const VisionEncoderCpu::LayerView lv = host_.layer_view(l);
    DevLayer& d = dl_[l];
    mat(d.qkv, lv.qkv);
    mat(d.o, lv.o);
    mat(d.fc1, lv.fc1);
    mat(d.fc2, lv.fc2);
    vec(d.ln1_w, lv.ln1_w, H);
    vec(d.ln1_b, lv.ln1_b, H);
    vec(d.qkv_b, lv.qkv_b, 3 * H);
    vec(d.o_b, lv.o_b, H);
    vec(d.ln2_w, lv.ln2_w, H);
    vec(d.ln2_b, lv.ln2_b, H);
    vec(d.fc1_b, lv.fc1_b, I);
    vec(d.fc2_b, lv.fc2_b, H);
    // cuBLASLt takes a bf16 output's bias in bf16 (for a bf16 checkpoint, its own values); uploaded whatever
    // the setting, so that the epilogue path can be switched at any time
    vec16(d.fc1_b16, lv.fc1_b, I);
    vec16(d.o_b16, lv.o_b, H);
    vec16(d.fc2_b16, lv.fc2_b, H);
  }
  dirty_ = false;
}

// The tower over one chunk on the residual stream x (x_ itself in float32, or x16_ in bf16); the
// post-LayerNorm's output lands in x_ (float32) either way.
template <typename X>
void CudaVisionEncoder::tower(X* x, const float* d_pixels, int n) {
  const VisionConfig& c = cfg_;
  const int N = c.num_patches(), H = c.hidden_size, I = c.intermediate_size, NH = c.num_heads, D = c.head_dim();
  const int R = n * N, L = c.num_layers;
  const float eps = c.layer_norm_eps, scale = 1.f / std::sqrt((float)D);
  cudaStream_t s = stream_;
  // the epilogues' bias in the residual stream's type (cuBLASLt: the output's)
  auto bias_of = [](const float* b32, const bf16* b16) {
    if constexpr (std::is_same<X, bf16>::value) return b16;
    else return b32;
  };
  vision_patch_embed(cublas_, x_, big_, d_pixels, patch_w_, patch_b_, pos_, n, c.num_channels, c.image_size,
                     c.patch_size, H, s, std::is_same<X, bf16>::value ? reinterpret_cast<bf16*>(x) : nullptr);
  mark(kStPatch);
  vision_layernorm<bf16>(xn_, x, nullptr, nullptr, dl_[0].ln1_w, dl_[0].ln1_b, R, H, eps, s);
  mark(kStLn1First);
  // the attention on the transposed product needs whole 16-byte rows per image (and the wgmma kernel chosen)
  const bool qkv_t = qkv_transposed_ && N % 8 == 0 && vision_attention_mode() != 1;
  // a product's bf16 output before its residual add: only without the residual epilogues (75 MB at 8 images of
  // SigLIP's shape), so allocated on first need
  if (!(o_residual_epilogue_ && residual_epilogue_) && !d_)
    d_ = static_cast<bf16*>(dalloc((size_t)max_images_ * N * H * 2));
  // a bf16 product without epilogue: through cuBLASLt for its timed algorithm, or plain cuBLAS
  auto product = [&](bf16* out, const bf16* a, const bf16* w, int K, int Nout) {
    if (lt_autotune_)
      vision_gemm_lt(lt_, out, true, a, w, nullptr, VisionEpilogue::kNone, R, K, Nout, s);
    else
      vision_gemm(cublas_, out, true, a, w, R, K, Nout, s);
  };
  for (int l = 0; l < L; ++l) {
    const DevLayer& w = dl_[l];
    if (qkv_t) {
      vision_gemm_lt_t(lt_, big_, xn_, w.qkv, R, H, 3 * H, s);
      mark(kStQkvT);
      vision_attention_wgmma_t(attn_, big_, w.qkv_b, w.qkv_b + 2 * H, n, N, NH, D, scale, s);
      mark(kStAttnT);
    } else {
      product(big_, xn_, w.qkv, H, 3 * H);
      mark(kStQkv);
      if (!qh_)  // only this path needs it (251 MB at 8 images of SigLIP's shape)
        qh_ = static_cast<bf16*>(dalloc((size_t)(3 * (int64_t)max_images_ * NH * N * kVisionDP) * 2));
      vision_qkv_bias_split(qh_, big_, w.qkv_b, n, N, NH, D, s);
      mark(kStQkvSplit);
      vision_attention(attn_, qh_, n, N, NH, D, scale, s);
      mark(kStAttn);
    }
    if (o_residual_epilogue_) {
      vision_gemm_residual_lt(lt_, x, attn_, w.o, bias_of(w.o_b, w.o_b16), R, H, H, s);
      mark(kStOResid);
      vision_layernorm<bf16>(xn_, x, nullptr, nullptr, w.ln2_w, w.ln2_b, R, H, eps, s);
      mark(kStLn2);
    } else {
      product(d_, attn_, w.o, H, H);
      mark(kStO);
      vision_layernorm<bf16>(xn_, x, d_, w.o_b, w.ln2_w, w.ln2_b, R, H, eps, s);
      mark(kStResLn2);
    }
    if (fc1_epilogue_) {
      vision_gemm_lt(lt_, big_, true, xn_, w.fc1, w.fc1_b16, VisionEpilogue::kGeluBias, R, H, I, s);
      mark(kStFc1Gelu);
    } else {
      vision_gemm(cublas_, big_, true, xn_, w.fc1, R, H, I, s);
      mark(kStFc1);
      vision_bias_gelu(big_, w.fc1_b, R, I, s);
      mark(kStGelu);
    }
    if (residual_epilogue_) {
      vision_gemm_residual_lt(lt_, x, big_, w.fc2, bias_of(w.fc2_b, w.fc2_b16), R, I, H, s);
      mark(kStFc2Resid);
      if (l + 1 < L) {
        vision_layernorm<bf16>(xn_, x, nullptr, nullptr, dl_[l + 1].ln1_w, dl_[l + 1].ln1_b, R, H, eps, s);
        mark(kStLn1);
      } else {
        vision_layernorm<float>(x_, x, nullptr, nullptr, post_w_, post_b_, R, H, eps, s);
        mark(kStPostLnOnly);
      }
      continue;
    }
    vision_gemm(cublas_, d_, true, big_, w.fc2, R, I, H, s);
    mark(kStFc2);
    if (l + 1 < L) {
      vision_layernorm<bf16>(xn_, x, d_, w.fc2_b, dl_[l + 1].ln1_w, dl_[l + 1].ln1_b, R, H, eps, s);
      mark(kStResLn1);
    } else {  // the post-LayerNorm, in place in float32
      vision_layernorm<float>(x_, x, d_, w.fc2_b, post_w_, post_b_, R, H, eps, s);
      mark(kStPostLn);
    }
  }
}

void CudaVisionEncoder::run_chunk(const float* d_pixels, int n, float* d_out, bool project) {
  const VisionConfig& c = cfg_;
  const int N = c.num_patches(), H = c.hidden_size, R = n * N;
  const float eps = c.layer_norm_eps;
  cudaStream_t s = stream_;
  if (residual_bf16_)
    tower(x16_, d_pixels, n);
  else
    tower(x_, d_pixels, n);
  if (project) {
    const int T = c.mm_tokens_per_image;
    vision_pool_rmsnorm(xn_, x_, soft_w_, n, c.patches_per_side(), c.pool_kernel(), H, eps, s);
    mark(kStPool);
    vision_gemm(cublas_, d_out, false, xn_, proj_w_, n * T, H, c.text_hidden_size, s);
    mark(kStProj);
  } else if (d_out != x_) {
    CUDA_CHECK(cudaMemcpyAsync(d_out, x_, (size_t)R * H * 4, cudaMemcpyDeviceToDevice, s));
    mark(kStCopyOut);
  }
}

void CudaVisionEncoder::prof_mark(int stage) {
  if (prof_n_ >= prof_ev_.size()) throw std::logic_error("CudaVisionEncoder: profiling event pool exhausted");
  CUDA_CHECK(cudaEventRecord(prof_ev_[prof_n_], stream_));
  prof_stage_[prof_n_++] = stage;
}

CudaVisionEncoder::StageProfile CudaVisionEncoder::profile_stages(const float* d_pixels, int n, float* d_out,
                                                                  bool project, int iters, int warmup) {
  if (n < 1 || n > max_images_)
    throw std::invalid_argument("profile_stages: n must be in [1, max_images=" + std::to_string(max_images_) +
                                "], got " + std::to_string(n));
  if (iters < 1 || warmup < 0) throw std::invalid_argument("profile_stages: iters >= 1, warmup >= 0");
  finalize();
  const VisionConfig& c = cfg_;
  const size_t need_ev = 8 + 9 * (size_t)c.num_layers;  // start, patch, ln1, 9 per layer, pool, proj | copy
  while (prof_ev_.size() < need_ev) {  // created once, kept for later calls
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    prof_ev_.push_back(e);
  }
  prof_stage_.assign(prof_ev_.size(), -1);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<std::vector<double>> per(kNumStages);
  std::vector<bool> seen(kNumStages, false);
  std::vector<double> totals;
  for (int it = -warmup; it < iters; ++it) {
    prof_n_ = 0;
    prof_on_ = true;
    try {
      mark(-1);
      run_chunk(d_pixels, n, d_out, project);
    } catch (...) {
      prof_on_ = false;
      throw;
    }
    prof_on_ = false;
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (it < 0) continue;
    std::vector<double> sum(kNumStages, 0.0);
    for (size_t i = 1; i < prof_n_; ++i) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, prof_ev_[i - 1], prof_ev_[i]));
      sum[prof_stage_[i]] += ms;
      seen[prof_stage_[i]] = true;
    }
    for (int k = 0; k < kNumStages; ++k) per[k].push_back(sum[k]);
    float tot = 0;
    CUDA_CHECK(cudaEventElapsedTime(&tot, prof_ev_[0], prof_ev_[prof_n_ - 1]));
    totals.push_back(tot);
  }
  // FLOPs of the products and of attention, minimum bytes of the elementwise stages, from the shapes
  const double N = c.num_patches(), H = c.hidden_size, I = c.intermediate_size, NH = c.num_heads, D = c.head_dim();
  const double L = c.num_layers, R = n * N, T = c.mm_tokens_per_image, Ht = c.text_hidden_size;
  const double pd = c.patch_dim(), px = (double)n * c.num_channels * c.image_size * c.image_size;
  const double DP = kVisionDP;
  auto gemm_bytes = [](double M, double K, double Nn, double ob) { return (M * K + K * Nn) * 2 + M * Nn * ob; };
  double flops[kNumStages] = {}, bytes[kNumStages] = {};
  flops[kStPatch] = 2 * R * pd * H;
  bytes[kStPatch] = px * 4 + 2 * R * pd * 2 + pd * H * 2 + R * H * 4 + N * H * 4;
  const double xb = residual_bf16_ ? 2 : 4;  // bytes per element of the residual stream
  bytes[kStLn1First] = R * H * (xb + 2);
  flops[kStQkv] = L * 2 * R * H * 3 * H;
  bytes[kStQkv] = L * gemm_bytes(R, H, 3 * H, 2);
  bytes[kStQkvSplit] = L * (R * 3 * H * 2 + 3 * R * NH * DP * 2);
  flops[kStAttn] = L * 4 * n * NH * N * N * D;  // Q.K^T and P.V at the real head dim
  bytes[kStAttn] = L * (3 * R * NH * DP * 2 + R * H * 2);
  flops[kStQkvT] = flops[kStQkv];
  bytes[kStQkvT] = bytes[kStQkv];
  flops[kStAttnT] = flops[kStAttn];
  bytes[kStAttnT] = L * (3 * R * H * 2 + R * H * 2);
  flops[kStO] = L * 2 * R * H * H;
  bytes[kStO] = L * gemm_bytes(R, H, H, 2);
  bytes[kStResLn2] = L * R * H * (xb + 2 + xb + 2);
  flops[kStFc1] = L * 2 * R * H * I;
  bytes[kStFc1] = L * gemm_bytes(R, H, I, 2);
  bytes[kStGelu] = L * R * I * 2 * 2;
  flops[kStFc2] = L * 2 * R * I * H;
  bytes[kStFc2] = L * gemm_bytes(R, I, H, 2);
  bytes[kStResLn1] = (L - 1) * R * H * (xb + 2 + xb + 2);
  bytes[kStPostLn] = R * H * (xb + 2 + 4);
  bytes[kStPool] = R * H * 4 + n * T * H * 2;
  flops[kStProj] = 2 * n * T * H * Ht;
  bytes[kStProj] = gemm_bytes(n * T, H, Ht, 4);
  bytes[kStCopyOut] = R * H * 4 * 2;
  flops[kStFc2Resid] = flops[kStFc2];
  bytes[kStFc2Resid] = L * (gemm_bytes(R, I, H, 0) + R * H * xb * 2);
  bytes[kStLn1] = (L - 1) * R * H * (xb + 2);
  bytes[kStPostLnOnly] = R * H * (xb + 4);
  flops[kStOResid] = flops[kStO];
  bytes[kStOResid] = L * (gemm_bytes(R, H, H, 0) + R * H * xb * 2);
  bytes[kStLn2] = L * R * H * (xb + 2);
  flops[kStFc1Gelu] = flops[kStFc1];
  bytes[kStFc1Gelu] = bytes[kStFc1];
  StageProfile p;
  p.n = n;
  p.iters = iters;
  p.total_ms = median_of(totals);
  for (int k = 0; k < kNumStages; ++k) {
    if (!seen[k]) continue;
    StageTime st;
    st.name = kStageNames[k];
    st.ms = median_of(per[k]);
    st.flops = flops[k];
    st.bytes = bytes[k];
    p.stages.push_back(st);
  }
  return p;
}

void CudaVisionEncoder::run_device(const float* d_pixels, int n, float* d_out, bool project) {
  if (n < 0) throw std::invalid_argument("negative image count");
  finalize();
  CUDA_CHECK(cudaDeviceSynchronize());
  const int64_t per_in = (int64_t)cfg_.num_channels * cfg_.image_size * cfg_.image_size;
  const int64_t per_out = project ? (int64_t)cfg_.mm_tokens_per_image * cfg_.text_hidden_size
                                  : (int64_t)cfg_.num_patches() * cfg_.hidden_size;
  for (int i = 0; i < n; i += max_images_) {
    const int k = std::min(max_images_, n - i);
    run_chunk(d_pixels + i * per_in, k, d_out + i * per_out, project);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaVisionEncoder::run_host(const float* pixels, int n, float* out, bool project) {
  if (n < 0) throw std::invalid_argument("negative image count");
  finalize();
  const int64_t per_in = (int64_t)cfg_.num_channels * cfg_.image_size * cfg_.image_size;
  const int64_t per_out = project ? (int64_t)cfg_.mm_tokens_per_image * cfg_.text_hidden_size
                                  : (int64_t)cfg_.num_patches() * cfg_.hidden_size;
  float* dout = project ? out_ : x_;  // the tower's output is x itself
  for (int i = 0; i < n; i += max_images_) {
    const int k = std::min(max_images_, n - i);
    CUDA_CHECK(cudaMemcpyAsync(pix_, pixels + i * per_in, (size_t)(k * per_in) * 4, cudaMemcpyHostToDevice, stream_));
    run_chunk(pix_, k, dout, project);
    CUDA_CHECK(cudaMemcpyAsync(out + i * per_out, dout, (size_t)(k * per_out) * 4, cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
}

}  // namespace g3
