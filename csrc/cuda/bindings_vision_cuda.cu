// bindings_vision_cuda.cu: the vision part of gemma3_native._cuda: CudaVisionEncoder (the Python interface
// of _core.VisionEncoderCpu) and the vision / multimodal CUDA kernels on numpy arrays (k_* functions, for
// the tests: float32 in, rounded to bf16 on the way in where the kernel takes bf16, float32 out).
// Called from cuda_module.cu through bind_vision_cuda().
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <memory>
#include <string>
#include <vector>
#include "bind_common.h"
#include "cpu/common.h"
#include "cuda/kernels.cuh"
#include "cuda/vision_engine.h"
#include "cuda/vision_kernels.cuh"

namespace py = pybind11;
using namespace g3;
using g3cuda::bf16;

namespace {
struct DevBuf {  // a device buffer for the kernel test functions
  void* p = nullptr;
  explicit DevBuf(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(p); }
};
std::unique_ptr<DevBuf> up_f32(const float* src, size_t n) {
  auto d = std::make_unique<DevBuf>(n * 4);
  CUDA_CHECK(cudaMemcpy(d->p, src, n * 4, cudaMemcpyHostToDevice));
  return d;
}
std::unique_ptr<DevBuf> up_bf16(const float* src, size_t n) {
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = f32_to_bf16(src[i]);
  auto d = std::make_unique<DevBuf>(n * 2);
  CUDA_CHECK(cudaMemcpy(d->p, h.data(), n * 2, cudaMemcpyHostToDevice));
  return d;
}
std::unique_ptr<DevBuf> up_i32(const int32_t* src, size_t n) {
  auto d = std::make_unique<DevBuf>(n * 4);
  CUDA_CHECK(cudaMemcpy(d->p, src, n * 4, cudaMemcpyHostToDevice));
  return d;
}
py::array_t<float> down_f32(const DevBuf& d, std::vector<py::ssize_t> shape) {
  py::array_t<float> out(shape);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(out.mutable_data(), d.p, (size_t)out.size() * 4, cudaMemcpyDeviceToHost));
  return out;
}
py::array_t<float> down_bf16(const DevBuf& d, std::vector<py::ssize_t> shape) {
  py::array_t<float> out(shape);
  const size_t n = (size_t)out.size();
  std::vector<uint16_t> h(n);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(h.data(), d.p, n * 2, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < n; ++i) out.mutable_data()[i] = bf16_to_f32(h[i]);
  return out;
}
struct Cublas {
  cublasHandle_t h = nullptr;
  Cublas() {
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
  }
  ~Cublas() { cublasDestroy(h); }
};
void check_pixels(const VisionConfig& c, const f32arr& px) {
  need(px.ndim() == 4 && px.shape(1) == c.num_channels && px.shape(2) == c.image_size && px.shape(3) == c.image_size,
       "pixel_values must be [n, " + std::to_string(c.num_channels) + ", " + std::to_string(c.image_size) + ", " +
           std::to_string(c.image_size) + "] float32");
}
// The tests' cuBLASLt plan caches: one with the heuristic's first algorithm, one timing its best 8; made on
// first use and kept for the process.
g3cuda::VisionLt* test_lt(bool autotune) {
  static g3cuda::VisionLt* plain = g3cuda::vision_lt_create(32u << 20);
  static g3cuda::VisionLt* tuned = g3cuda::vision_lt_create(32u << 20, true);
  return autotune ? tuned : plain;
}

}  // namespace

// Sets vision_attention_mode() from a kernel name for one call ("auto", "mma", "wgmma"), then restores it.
struct AttentionKernelScope {
  int saved;
  explicit AttentionKernelScope(const std::string& kernel) : saved(g3cuda::vision_attention_mode()) {
    int m = -1;
    if (kernel == "auto") m = 0;
    else if (kernel == "mma") m = 1;
    else if (kernel == "wgmma") m = 2;
    need(m >= 0, "vision attention: kernel must be 'auto', 'mma' or 'wgmma', got '" + kernel + "'");
    need(m != 2 || g3cuda::vision_attention_wgmma_available(),
         "vision attention: kernel='wgmma' needs a compute capability 9.0 GPU and a build with sm_90a");
    g3cuda::vision_attention_mode() = m;
  }
  ~AttentionKernelScope() { g3cuda::vision_attention_mode() = saved; }
};

void bind_vision_cuda(py::module_& m) {
  py::class_<CudaVisionEncoder>(m, "CudaVisionEncoder")
      .def(py::init([](const VisionConfig& cfg, const std::string& dtype, int max_images) {
             cfg.validate();
             return new CudaVisionEncoder(cfg, parse_dtype(dtype), max_images);
           }),
           py::arg("config"), py::arg("dtype") = "bfloat16", py::arg("max_images") = 4)
      .def_property_readonly("config", &CudaVisionEncoder::config)
      .def_property_readonly("max_images", &CudaVisionEncoder::max_images)
      .def_property_readonly("weight_bytes", [](CudaVisionEncoder& e) { return e.host().bytes(); })
      .def_property_readonly("device_bytes", &CudaVisionEncoder::device_bytes)
      .def_property("fc1_epilogue", &CudaVisionEncoder::fc1_epilogue, &CudaVisionEncoder::set_fc1_epilogue,
                    "fc1's bias and gelu_tanh in its product's cuBLASLt epilogue (no gelu pass)")
      .def_property("lt_autotune", &CudaVisionEncoder::lt_autotune, &CudaVisionEncoder::set_lt_autotune,
                    "the epilogue products take the fastest of cuBLASLt's 8 best algorithms, timed on first use "
                    "(the heuristic's first when off); switching drops the plans made so far")
      .def_property("residual_epilogue", &CudaVisionEncoder::residual_epilogue,
                    &CudaVisionEncoder::set_residual_epilogue,
                    "the fc2 product adds itself and its bias to the float32 residual stream in cuBLASLt's "
                    "epilogue (the LayerNorm pass after it then only normalises)")
      .def_property("residual_bf16", &CudaVisionEncoder::residual_bf16, &CudaVisionEncoder::set_residual_bf16,
                    "the residual stream in bf16 as transformers' bf16 tower keeps it (each sum rounded once), "
                    "instead of float32")
      .def_property("o_residual_epilogue", &CudaVisionEncoder::o_residual_epilogue,
                    &CudaVisionEncoder::set_o_residual_epilogue,
                    "the o product adds itself and its bias to the residual stream in cuBLASLt's epilogue")
      .def_property("qkv_transposed", &CudaVisionEncoder::qkv_transposed, &CudaVisionEncoder::set_qkv_transposed,
                    "the q/k/v product written transposed and read by the wgmma attention as it is (no split pass; "
                    "compute capability 9.0 only, patch counts a multiple of 8)")
      .def_property_readonly("weight_dtype", [](CudaVisionEncoder& e) { return std::string(dtype_name(e.dtype())); })
      .def("expected_weights", [](CudaVisionEncoder& e) { return e.host().expected(); })
      .def("missing_weights", [](CudaVisionEncoder& e) { return e.host().missing(); })
      .def("set_weight",
           [](CudaVisionEncoder& e, const std::string& name, py::array a) {
             a = py::array::ensure(a, py::array::c_style);
             const DType dt = dtype_of(a, name);
             std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
             e.set(name, a.data(), dt, shape);
           })
      .def("finalize", [](CudaVisionEncoder& e) { py::gil_scoped_release nogil; e.finalize(); })
      .def("encode",
           [](CudaVisionEncoder& e, f32arr px) {
             const VisionConfig& c = e.config();
             check_pixels(c, px);
             py::array_t<float> out({(py::ssize_t)px.shape(0), (py::ssize_t)c.num_patches(), (py::ssize_t)c.hidden_size});
             {
               py::gil_scoped_release nogil;
               e.encode(px.data(), (int)px.shape(0), out.mutable_data());
             }
             return out;
           },
           py::arg("pixel_values"), "SigLIP tower: [n, C, S, S] -> post-LayerNorm hidden states [n, patches, hidden]")
      .def("forward",
           [](CudaVisionEncoder& e, f32arr px) {
             const VisionConfig& c = e.config();
             check_pixels(c, px);
             py::array_t<float> out({(py::ssize_t)px.shape(0), (py::ssize_t)c.mm_tokens_per_image, (py::ssize_t)c.text_hidden_size});
             {
               py::gil_scoped_release nogil;
               e.forward(px.data(), (int)px.shape(0), out.mutable_data());
             }
             return out;
           },
           py::arg("pixel_values"), "tower + projector: [n, C, S, S] -> image embeddings [n, mm_tokens, text_hidden]")
      .def("run_device",
           [](CudaVisionEncoder& e, uintptr_t pixels, int n, uintptr_t out, bool project) {
             need(pixels != 0 && out != 0, "run_device: null device pointer");
             py::gil_scoped_release nogil;
             e.run_device(reinterpret_cast<const float*>(pixels), n, reinterpret_cast<float*>(out), project);
           },
           py::arg("pixels_ptr"), py::arg("n"), py::arg("out_ptr"), py::arg("project"),
           "device pointers (e.g. torch .data_ptr()): float32 pixels [n, C, S, S] -> float32 out, as encode "
           "(project=False) or forward (project=True); waits for the device first, returns when done")
      .def("profile_stages",
           [](CudaVisionEncoder& e, uintptr_t pixels, int n, uintptr_t out, bool project, int iters, int warmup) {
             need(pixels != 0 && out != 0, "profile_stages: null device pointer");
             CudaVisionEncoder::StageProfile p;
             {
               py::gil_scoped_release nogil;
               p = e.profile_stages(reinterpret_cast<const float*>(pixels), n, reinterpret_cast<float*>(out), project,
                                    iters, warmup);
             }
             py::dict ms, flops, bytes, r;
             for (const auto& st : p.stages) {
               ms[py::str(st.name)] = st.ms;
               flops[py::str(st.name)] = st.flops;
               bytes[py::str(st.name)] = st.bytes;
             }
             r["ms"] = ms;
             r["flops"] = flops;
             r["bytes"] = bytes;
             r["total_ms"] = p.total_ms;
             r["n"] = p.n;
             r["iters"] = p.iters;
             r["layers"] = e.config().num_layers;
             return r;
           },
           py::arg("pixels_ptr"), py::arg("n"), py::arg("out_ptr"), py::arg("project"), py::arg("iters") = 20,
           py::arg("warmup") = 2,
           "per-stage timing of one chunk (n <= max_images; device pointers as run_device) with cudaEvents between "
           "the stages: {'ms': {stage: median ms per batch, per-layer stages summed over the layers}, 'flops': "
           "{stage: FLOPs (products, attention; else 0)}, 'bytes': {stage: minimum global bytes}, 'total_ms': "
           "median first-to-last event time, 'n', 'iters', 'layers'}");

  // ---- timing entry points on device pointers (benchmarks): one launch on `stream`, no synchronization ----
  // qh [3, heads, n_img, N, 80] bf16 (vision_qkv_bias_split's layout, head dims past D zero) -> out
  // [n_img * N, heads * D] bf16.
  // kernel: "auto" (vision_attention's choice), "mma" (mma.sync) or "wgmma" (sm_90a).
  m.def("k_vision_attention_ptr",
        [](uintptr_t out, uintptr_t qh, int n_img, int N, int heads, int D, float scale, uintptr_t stream,
           const std::string& kernel) {
          need(out != 0 && qh != 0, "k_vision_attention_ptr: null device pointer");
          AttentionKernelScope k(kernel);
          g3cuda::vision_attention(reinterpret_cast<bf16*>(out), reinterpret_cast<const bf16*>(qh), n_img, N, heads, D,
                                   scale, reinterpret_cast<cudaStream_t>(stream));
        },
        py::arg("out_ptr"), py::arg("qh_ptr"), py::arg("n_img"), py::arg("N"), py::arg("heads"), py::arg("D"),
        py::arg("scale"), py::arg("stream") = 0, py::arg("kernel") = "auto");
  // qkv_t [3 * heads * D, n_img * N] bf16 (the transposed product, no bias), q_bias / v_bias [heads * D] f32
  // -> out [n_img * N, heads * D] bf16 through vision_attention_wgmma_t.
  m.def("k_vision_attention_t_ptr",
        [](uintptr_t out, uintptr_t qkv_t, uintptr_t q_bias, uintptr_t v_bias, int n_img, int N, int heads, int D,
           float scale, uintptr_t stream) {
          need(out != 0 && qkv_t != 0 && q_bias != 0 && v_bias != 0, "k_vision_attention_t_ptr: null device pointer");
          g3cuda::vision_attention_wgmma_t(reinterpret_cast<bf16*>(out), reinterpret_cast<const bf16*>(qkv_t),
                                           reinterpret_cast<const float*>(q_bias), reinterpret_cast<const float*>(v_bias),
                                           n_img, N, heads, D, scale, reinterpret_cast<cudaStream_t>(stream));
        },
        py::arg("out_ptr"), py::arg("qkv_t_ptr"), py::arg("q_bias_ptr"), py::arg("v_bias_ptr"), py::arg("n_img"),
        py::arg("N"), py::arg("heads"), py::arg("D"), py::arg("scale"), py::arg("stream") = 0);
  m.def("k_vision_wgmma_pingpong", [](bool on) {
          const bool was = g3cuda::vision_wgmma_pingpong() != 0;
          g3cuda::vision_wgmma_pingpong() = on ? 1 : 0;
          return was;
        },
        "The wgmma vision attention's warpgroups take turns issuing their products (on) or not (off); returns "
        "the setting before");
  m.def("vision_wgmma_available", &g3cuda::vision_attention_wgmma_available,
        "True where vision_attention runs its warpgroup-MMA kernel (built for sm_90a, compute capability 9.0)");
  // out [M, N] = x [M, K] . w [N, K]^T, bf16 inputs, out bf16 (or float32), through vision_gemm (the
  // encoder's cuBLAS call) on a handle of this module's own.
  m.def("k_vision_gemm_ptr",
        [](uintptr_t out, uintptr_t x, uintptr_t w, int M, int K, int N, bool out_bf16, uintptr_t stream) {
          need(out != 0 && x != 0 && w != 0, "k_vision_gemm_ptr: null device pointer");
          static cublasHandle_t h = [] {  // created once, kept for the process
            cublasHandle_t hh = nullptr;
            if (cublasCreate(&hh) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
            return hh;
          }();
          g3cuda::vision_gemm(h, reinterpret_cast<void*>(out), out_bf16, reinterpret_cast<const bf16*>(x),
                              reinterpret_cast<const bf16*>(w), M, K, N, reinterpret_cast<cudaStream_t>(stream));
        },
        py::arg("out_ptr"), py::arg("x_ptr"), py::arg("w_ptr"), py::arg("M"), py::arg("K"), py::arg("N"),
        py::arg("out_bf16") = true, py::arg("stream") = 0);

  // ---- vision kernels on numpy arrays (tests) ----
  // images [n, C, S, S], w [H, C*p*p] (rounded to bf16), bias [H], pos [(S/p)^2, H] -> x [n * (S/p)^2, H]
  // bf16_resid: the sum rounded to bf16 into the bf16 residual stream (returned as float32)
  m.def("k_vision_patch_embed", [](f32arr img, f32arr w, f32arr bias, f32arr pos, int patch, bool bf16_resid) {
    need(img.ndim() == 4 && img.shape(2) == img.shape(3) && patch > 0 && img.shape(2) % patch == 0,
         "k_vision_patch_embed: images [n, C, S, S], S a multiple of patch");
    const int n = (int)img.shape(0), C = (int)img.shape(1), S = (int)img.shape(2), g = S / patch;
    need(w.ndim() == 2 && w.shape(1) == (py::ssize_t)C * patch * patch, "k_vision_patch_embed: w [H, C*p*p]");
    const int H = (int)w.shape(0), P = g * g;
    need(bias.size() == H && pos.ndim() == 2 && pos.shape(0) == P && pos.shape(1) == H,
         "k_vision_patch_embed: bias [H], pos [patches, H]");
    Cublas cb;
    const int pd = C * patch * patch, ld = g3cuda::vision_patch_ld(C, patch);
    std::vector<float> wp((size_t)H * ld, 0.f);  // the weight's rows zero-padded to ld, as the encoder uploads it
    for (int r = 0; r < H; ++r) std::copy(w.data() + (size_t)r * pd, w.data() + (size_t)(r + 1) * pd, wp.begin() + (size_t)r * ld);
    auto di = up_f32(img.data(), img.size());
    auto dw = up_bf16(wp.data(), wp.size());
    auto db = up_f32(bias.data(), bias.size());
    auto dp = up_f32(pos.data(), pos.size());
    DevBuf x((size_t)n * P * H * 4), patches((size_t)n * P * ld * 2), x16((size_t)n * P * H * 2);
    g3cuda::vision_patch_embed(cb.h, x.as<float>(), patches.as<bf16>(), di->as<float>(), dw->as<bf16>(), db->as<float>(),
                               dp->as<float>(), n, C, S, patch, H, 0, bf16_resid ? x16.as<bf16>() : nullptr);
    return bf16_resid ? down_bf16(x16, {n * P, H}) : down_f32(x, {n * P, H});
  }, py::arg("img"), py::arg("w"), py::arg("bias"), py::arg("pos"), py::arg("patch"), py::arg("bf16_resid") = false);
  // Tests only: route the elementwise vision kernels to their scalar fallbacks (on) or back (off).
  m.def("k_vision_force_scalar", [](bool on) { g3cuda::vision_force_scalar() = on; });
  // x f32 [rows, dim] (bf16_resid: rounded to bf16, the bf16 residual stream); delta (rounded to bf16) and dbias
  // optional -> (x after the residual add, LN out)
  m.def("k_vision_layernorm", [](f32arr x, f32arr w, f32arr b, float eps, py::object delta, py::object dbias,
                                 bool bf16_out, bool bf16_resid) {
    need(x.ndim() == 2 && w.size() == x.shape(1) && b.size() == x.shape(1), "k_vision_layernorm: x [rows, dim], w, b [dim]");
    need(delta.is_none() == dbias.is_none(), "k_vision_layernorm: delta and dbias go together");
    const int rows = (int)x.shape(0), dim = (int)x.shape(1);
    auto dx = bf16_resid ? up_bf16(x.data(), x.size()) : up_f32(x.data(), x.size());
    auto dw = up_f32(w.data(), w.size());
    auto dbb = up_f32(b.data(), b.size());
    std::unique_ptr<DevBuf> dd, ddb;
    if (!delta.is_none()) {
      f32arr d = delta.cast<f32arr>(), db = dbias.cast<f32arr>();
      need(d.size() == x.size() && db.size() == dim, "k_vision_layernorm: delta like x, dbias [dim]");
      dd = up_bf16(d.data(), d.size());
      ddb = up_f32(db.data(), db.size());
    }
    const bf16* dp = dd ? dd->as<bf16>() : nullptr;
    const float* dbp = ddb ? ddb->as<float>() : nullptr;
    DevBuf o((size_t)rows * dim * (bf16_out ? 2 : 4));
    auto run = [&](auto* xp) {
      if (bf16_out)
        g3cuda::vision_layernorm<bf16>(o.as<bf16>(), xp, dp, dbp, dw->as<float>(), dbb->as<float>(), rows, dim, eps, 0);
      else
        g3cuda::vision_layernorm<float>(o.as<float>(), xp, dp, dbp, dw->as<float>(), dbb->as<float>(), rows, dim, eps, 0);
    };
    if (bf16_resid)
      run(dx->as<bf16>());
    else
      run(dx->as<float>());
    py::array_t<float> xo = bf16_resid ? down_bf16(*dx, {rows, dim}) : down_f32(*dx, {rows, dim});
    return py::make_tuple(xo, bf16_out ? down_bf16(o, {rows, dim}) : down_f32(o, {rows, dim}));
  }, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("eps"), py::arg("delta") = py::none(),
     py::arg("dbias") = py::none(), py::arg("bf16_out") = true, py::arg("bf16_resid") = false);
  // qkv [n_img * N, 3 * heads * D] (rounded to bf16), bias [3 * heads * D] -> qh [3, heads, n_img, N, 80]
  m.def("k_vision_qkv_bias_split", [](f32arr qkv, f32arr bias, int n_img, int heads) {
    need(qkv.ndim() == 2 && n_img > 0 && heads > 0 && qkv.shape(0) % n_img == 0 && qkv.shape(1) % (3 * heads) == 0 &&
             bias.size() == qkv.shape(1),
         "k_vision_qkv_bias_split: qkv [n_img * N, 3 * heads * D], bias [3 * heads * D]");
    const int N = (int)qkv.shape(0) / n_img, D = (int)qkv.shape(1) / (3 * heads);
    auto dq = up_bf16(qkv.data(), qkv.size());
    auto db = up_f32(bias.data(), bias.size());
    DevBuf o((size_t)3 * n_img * heads * N * g3cuda::kVisionDP * 2);
    g3cuda::vision_qkv_bias_split(o.as<bf16>(), dq->as<bf16>(), db->as<float>(), n_img, N, heads, D, 0);
    return down_bf16(o, {3, heads, n_img, N, g3cuda::kVisionDP});
  });
  // h [rows, cols] (rounded to bf16), bias [cols] -> gelu_tanh(h + bias) (bf16)
  m.def("k_vision_bias_gelu", [](f32arr h, f32arr bias) {
    need(h.ndim() == 2 && bias.size() == h.shape(1), "k_vision_bias_gelu: h [rows, cols], bias [cols]");
    auto dh = up_bf16(h.data(), h.size());
    auto db = up_f32(bias.data(), bias.size());
    g3cuda::vision_bias_gelu(dh->as<bf16>(), db->as<float>(), (int)h.shape(0), (int)h.shape(1), 0);
    return down_bf16(*dh, {h.shape(0), h.shape(1)});
  });
  // q, k, v [n_img, N, heads, D] (rounded to bf16) -> out [n_img, N, heads, D] (bf16)
  m.def("k_vision_attention", [](f32arr q, f32arr k, f32arr v, float scale, const std::string& kernel) {
    need(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && q.size() == k.size() && q.size() == v.size(),
         "k_vision_attention: q, k, v [n_img, N, heads, D] of one shape");
    const int n_img = (int)q.shape(0), N = (int)q.shape(1), heads = (int)q.shape(2), D = (int)q.shape(3);
    need(D <= g3cuda::kVisionDP, "k_vision_attention: head_dim <= 80");
    const int DP = g3cuda::kVisionDP;
    std::vector<float> qh((size_t)3 * n_img * heads * N * DP, 0.f);  // the padded layout, built on the host
    const f32arr* src[3] = {&q, &k, &v};
    for (int w = 0; w < 3; ++w)
      for (int i = 0; i < n_img; ++i)
        for (int n = 0; n < N; ++n)
          for (int h = 0; h < heads; ++h)
            for (int d = 0; d < D; ++d)
              qh[((size_t)g3cuda::vision_qh_slice(w, h, i, heads, n_img) * N + n) * DP + d] =
                  src[w]->data()[(((size_t)i * N + n) * heads + h) * D + d];
    auto dq = up_bf16(qh.data(), qh.size());
    DevBuf o((size_t)n_img * N * heads * D * 2);
    AttentionKernelScope ks(kernel);
    g3cuda::vision_attention(o.as<bf16>(), dq->as<bf16>(), n_img, N, heads, D, scale, 0);
    return down_bf16(o, {n_img, N, heads, D});
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("kernel") = "auto");
  // q, k, v [n_img, N, heads, D] (rounded to bf16), biases [heads * D] -> out [n_img, N, heads, D] (bf16) through
  // vision_attention_wgmma_t on the transposed layout built on the host; k's bias is not passed (the kernel
  // does not need it), so that a test can check the softmax's invariance with a reference that adds it.
  m.def("k_vision_attention_t", [](f32arr q, f32arr k, f32arr v, f32arr q_bias, f32arr v_bias, float scale) {
    need(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && q.size() == k.size() && q.size() == v.size(),
         "k_vision_attention_t: q, k, v [n_img, N, heads, D] of one shape");
    const int n_img = (int)q.shape(0), N = (int)q.shape(1), heads = (int)q.shape(2), D = (int)q.shape(3);
    need(q_bias.size() == (py::ssize_t)heads * D && v_bias.size() == (py::ssize_t)heads * D,
         "k_vision_attention_t: q_bias, v_bias [heads * D]");
    need(g3cuda::vision_attention_wgmma_available(), "k_vision_attention_t: needs the wgmma kernel (sm_90a, cc 9.0)");
    const size_t R = (size_t)n_img * N, H = (size_t)heads * D;
    std::vector<float> t(3 * H * R);  // [which * H + h * D + d][i * N + n]
    const f32arr* src[3] = {&q, &k, &v};
    for (int w = 0; w < 3; ++w)
      for (size_t r = 0; r < R; ++r)
        for (size_t f = 0; f < H; ++f) t[(w * H + f) * R + r] = src[w]->data()[r * H + f];
    auto dt = up_bf16(t.data(), t.size());
    auto dqb = up_f32(q_bias.data(), q_bias.size());
    auto dvb = up_f32(v_bias.data(), v_bias.size());
    DevBuf o(R * H * 2);
    g3cuda::vision_attention_wgmma_t(o.as<bf16>(), dt->as<bf16>(), dqb->as<float>(), dvb->as<float>(), n_img, N, heads,
                                     D, scale, 0);
    return down_bf16(o, {n_img, N, heads, D});
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_bias"), py::arg("v_bias"), py::arg("scale"));
  // y [n_img * g*g, H] f32, w [H] -> [n_img * (g/k)^2, H] (bf16)
  m.def("k_vision_pool_rmsnorm", [](f32arr y, f32arr w, int n_img, int grid, int k, float eps) {
    need(y.ndim() == 2 && n_img > 0 && y.shape(0) == (py::ssize_t)n_img * grid * grid && w.size() == y.shape(1) && k > 0 &&
             grid % k == 0,
         "k_vision_pool_rmsnorm: y [n_img * grid^2, H], w [H], grid a multiple of k");
    const int H = (int)y.shape(1), t = grid / k;
    auto dy = up_f32(y.data(), y.size());
    auto dw = up_f32(w.data(), w.size());
    DevBuf o((size_t)n_img * t * t * H * 2);
    g3cuda::vision_pool_rmsnorm(o.as<bf16>(), dy->as<float>(), dw->as<float>(), n_img, grid, k, H, eps, 0);
    return down_bf16(o, {n_img * t * t, H});
  });
  // x [M, K] . w[N, K]^T, inputs rounded to bf16; out bf16 or float32
  m.def("k_vision_gemm", [](f32arr x, f32arr w, bool bf16_out) {
    need(x.ndim() == 2 && w.ndim() == 2 && x.shape(1) == w.shape(1), "k_vision_gemm: x [M, K], w [N, K]");
    const int M = (int)x.shape(0), K = (int)x.shape(1), N = (int)w.shape(0);
    Cublas cb;
    auto dx = up_bf16(x.data(), x.size());
    auto dw = up_bf16(w.data(), w.size());
    DevBuf o((size_t)M * N * (bf16_out ? 2 : 4));
    g3cuda::vision_gemm(cb.h, o.p, bf16_out, dx->as<bf16>(), dw->as<bf16>(), M, K, N, 0);
    return bf16_out ? down_bf16(o, {M, N}) : down_f32(o, {M, N});
  });
  // x [M, K] . w[N, K]^T + bias [N] (gelu_tanh after it for "gelu_bias") through cuBLASLt's epilogue
  // (vision_gemm_lt); inputs rounded to bf16 (the bias too with a bf16 out); out bf16 or float32
  // ("none": the product alone, bias unused); autotune: the algorithm timed among cuBLASLt's 8 best
  m.def("k_vision_gemm_epilogue", [](f32arr x, f32arr w, f32arr bias, const std::string& epilogue, bool bf16_out,
                                     bool autotune) {
    need(x.ndim() == 2 && w.ndim() == 2 && x.shape(1) == w.shape(1) && bias.size() == w.shape(0),
         "k_vision_gemm_epilogue: x [M, K], w [N, K], bias [N]");
    need(epilogue == "bias" || epilogue == "gelu_bias" || epilogue == "none",
         "k_vision_gemm_epilogue: epilogue must be 'bias', 'gelu_bias' or 'none'");
    g3cuda::VisionLt* lt = test_lt(autotune);
    const int M = (int)x.shape(0), K = (int)x.shape(1), N = (int)w.shape(0);
    auto dx = up_bf16(x.data(), x.size());
    auto dw = up_bf16(w.data(), w.size());
    auto db = bf16_out ? up_bf16(bias.data(), bias.size()) : up_f32(bias.data(), bias.size());  // in D's type
    DevBuf o((size_t)M * N * (bf16_out ? 2 : 4));
    g3cuda::vision_gemm_lt(lt, o.p, bf16_out, dx->as<bf16>(), dw->as<bf16>(), db->p,
                           epilogue == "bias"        ? g3cuda::VisionEpilogue::kBias
                           : epilogue == "gelu_bias" ? g3cuda::VisionEpilogue::kGeluBias
                                                     : g3cuda::VisionEpilogue::kNone,
                           M, K, N, 0);
    return bf16_out ? down_bf16(o, {M, N}) : down_f32(o, {M, N});
  }, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("epilogue"), py::arg("bf16_out"), py::arg("autotune") = false);
  // (x [M, K] . w [N, K]^T)^T -> [N, M] bf16 through vision_gemm_lt_t (inputs rounded to bf16)
  m.def("k_vision_gemm_t", [](f32arr x, f32arr w, bool autotune) {
    need(x.ndim() == 2 && w.ndim() == 2 && x.shape(1) == w.shape(1), "k_vision_gemm_t: x [M, K], w [N, K]");
    const int M = (int)x.shape(0), K = (int)x.shape(1), N = (int)w.shape(0);
    auto dx = up_bf16(x.data(), x.size());
    auto dw = up_bf16(w.data(), w.size());
    DevBuf o((size_t)M * N * 2);
    g3cuda::vision_gemm_lt_t(test_lt(autotune), o.as<bf16>(), dx->as<bf16>(), dw->as<bf16>(), M, K, N, 0);
    return down_bf16(o, {N, M});
  }, py::arg("x"), py::arg("w"), py::arg("autotune") = false);
  // x [M, N] + a [M, K] . w [N, K]^T + bias [N] in float32 (a, w rounded to bf16) through
  // vision_gemm_residual_lt (the residual stream's update in cuBLASLt's epilogue)
  // bf16_resid: x and bias rounded to bf16, the bf16 residual stream's update (returned as float32)
  m.def("k_vision_gemm_residual", [](f32arr x, f32arr a, f32arr w, f32arr bias, bool bf16_resid) {
    need(x.ndim() == 2 && a.ndim() == 2 && w.ndim() == 2 && a.shape(1) == w.shape(1) && x.shape(0) == a.shape(0) &&
             x.shape(1) == w.shape(0) && bias.size() == w.shape(0),
         "k_vision_gemm_residual: x [M, N], a [M, K], w [N, K], bias [N]");
    g3cuda::VisionLt* lt = test_lt(false);
    const int M = (int)a.shape(0), K = (int)a.shape(1), N = (int)w.shape(0);
    auto da = up_bf16(a.data(), a.size());
    auto dw = up_bf16(w.data(), w.size());
    if (bf16_resid) {
      auto dx = up_bf16(x.data(), x.size());
      auto db = up_bf16(bias.data(), bias.size());
      g3cuda::vision_gemm_residual_lt(lt, dx->as<bf16>(), da->as<bf16>(), dw->as<bf16>(), db->as<bf16>(), M, K, N, 0);
      return down_bf16(*dx, {M, N});
    }
    auto dx = up_f32(x.data(), x.size());
    auto db = up_f32(bias.data(), bias.size());
    g3cuda::vision_gemm_residual_lt(lt, dx->as<float>(), da->as<bf16>(), dw->as<bf16>(), db->as<float>(), M, K, N, 0);
    return down_f32(*dx, {M, N});
  }, py::arg("x"), py::arg("a"), py::arg("w"), py::arg("bias"), py::arg("bf16_resid") = false);
  // x [T, H] with rows[e] replaced by src[e]
  m.def("k_scatter_rows", [](f32arr x, f32arr src, i32arr rows) {
    need(x.ndim() == 2 && src.ndim() == 2 && src.shape(1) == x.shape(1) && rows.size() == src.shape(0),
         "k_scatter_rows: x [T, H], src [n, H], rows [n]");
    for (py::ssize_t i = 0; i < rows.size(); ++i)
      need(rows.data()[i] >= 0 && rows.data()[i] < x.shape(0), "k_scatter_rows: row out of range");
    auto dx = up_f32(x.data(), x.size());
    auto ds = up_f32(src.data(), src.size());
    auto dr = up_i32(rows.data(), rows.size());
    g3cuda::scatter_rows(dx->as<float>(), ds->as<float>(), dr->as<int32_t>(), (int)rows.size(), (int)x.shape(1), 0);
    return down_f32(*dx, {x.shape(0), x.shape(1)});
  });
  // Prefill attention of one sequence's chunk (slot 0, n queries from `start`) with per-token extents
  // (bidirectional image blocks), bf16: path "tc" (D 128/256) or "generic". k/v caches [KVH, cap, D] hold
  // the positions before start (ring slot j % cap).
  m.def("k_attention_extent", [](f32arr q, f32arr k_new, f32arr v_new, f32arr k_cache, f32arr v_cache, int start,
                                 int window, float scale, i32arr extent, const std::string& path) {
    need(q.ndim() == 3 && k_new.ndim() == 3 && v_new.ndim() == 3 && k_cache.ndim() == 3 && v_cache.ndim() == 3,
         "k_attention_extent: 3-D arrays");
    const int n = (int)q.shape(0), NH = (int)q.shape(1), D = (int)q.shape(2), KVH = (int)k_new.shape(1);
    const int cap = (int)k_cache.shape(1);
    need(extent.size() == n, "k_attention_extent: one extent per query");
    need(path == "tc" || path == "generic", "k_attention_extent: path must be 'tc' or 'generic'");
    std::vector<int32_t> meta(4 + 2 * n);
    meta[0] = 0; meta[1] = start; meta[2] = n; meta[3] = 0;
    for (int i = 0; i < n; ++i) { meta[4 + i] = start + i; meta[4 + n + i] = 0; }
    auto dm = up_i32(meta.data(), meta.size());
    auto de = up_i32(extent.data(), extent.size());
    const int32_t* p = dm->as<int32_t>();
    g3cuda::SeqMeta seq{p, p + 1, p + 2, p + 3, de->as<int32_t>()};
    g3cuda::TokMeta tok{p + 4, p + 4 + n};
    auto dq = up_bf16(q.data(), q.size());
    auto dk = up_bf16(k_new.data(), k_new.size());
    auto dv = up_bf16(v_new.data(), v_new.size());
    auto dkc = up_bf16(k_cache.data(), k_cache.size());
    auto dvc = up_bf16(v_cache.data(), v_cache.size());
    DevBuf out((size_t)n * NH * D * 2);
    if (path == "tc") {
      need(g3cuda::attention_prefill_tc_supported(D), "k_attention_extent: the tensor-core path takes D 128 or 256");
      std::vector<int2> tiles;
      for (int q0 = 0; q0 < n; q0 += 64) tiles.push_back(make_int2(0, q0));
      auto dt = std::make_unique<DevBuf>(tiles.size() * sizeof(int2));
      CUDA_CHECK(cudaMemcpy(dt->p, tiles.data(), tiles.size() * sizeof(int2), cudaMemcpyHostToDevice));
      g3cuda::attention_prefill_tc(out.as<bf16>(), dq->as<bf16>(), dk->as<bf16>(), dv->as<bf16>(), dkc->as<bf16>(),
                                   dvc->as<bf16>(), seq, dt->as<int2>(), (int)tiles.size(), NH, KVH, D, cap, window,
                                   scale, 0.f, 0);
      CUDA_CHECK(cudaDeviceSynchronize());
    } else {
      g3cuda::attention_generic<bf16>(out.as<bf16>(), dq->as<bf16>(), dk->as<bf16>(), dv->as<bf16>(), dkc->as<bf16>(),
                                      dvc->as<bf16>(), tok, seq, n, NH, KVH, D, cap, window, scale, 0.f, 0);
    }
    return down_bf16(out, {n, NH, D});
  }, py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_cache"), py::arg("v_cache"), py::arg("start"),
     py::arg("window"), py::arg("scale"), py::arg("extent"), py::arg("path"));
}
