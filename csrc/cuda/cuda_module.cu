// cuda_module.cu: gemma3_native._cuda, the CUDA backend's Python module: CudaEngine (the CPU
// engine's interface, so the Python layer switches backends with one line) and each CUDA kernel on
// numpy arrays (k_* functions, for the tests: inputs float32, converted to the storage type on the
// way in when bf16=True, outputs back as float32). bfloat16 weights travel as uint16 bit patterns.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include "bind_common.h"
#include "cpu/common.h"
#include "cpu/kernels.h"  // rope_inv_freq
#include "cuda/engine.h"
#include "engine_cpu.h"
#include "cuda/kernels.cuh"

namespace py = pybind11;
using namespace g3;
void bind_vision_cuda(py::module_& m);
using g3cuda::bf16;

namespace {
// A device buffer for the kernel test functions.
struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(p); }
};
template <typename E>
std::unique_ptr<Dev> up(const float* src, size_t n) {
  auto d = std::make_unique<Dev>(n * sizeof(E));
  if constexpr (std::is_same<E, float>::value) {
    CUDA_CHECK(cudaMemcpy(d->p, src, n * 4, cudaMemcpyHostToDevice));
  } else {
    std::vector<uint16_t> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = f32_to_bf16(src[i]);
    CUDA_CHECK(cudaMemcpy(d->p, h.data(), n * 2, cudaMemcpyHostToDevice));
  }
  return d;
}
template <typename E>
std::unique_ptr<Dev> up(const f32arr& a) { return up<E>(a.data(), (size_t)a.size()); }
std::unique_ptr<Dev> up_raw(const void* src, size_t bytes) {
  auto d = std::make_unique<Dev>(bytes);
  CUDA_CHECK(cudaMemcpy(d->p, src, bytes, cudaMemcpyHostToDevice));
  return d;
}
template <typename E>
py::array_t<float> down(const Dev& d, std::vector<py::ssize_t> shape) {
  py::array_t<float> out(shape);
  const size_t n = (size_t)out.size();
  CUDA_CHECK(cudaDeviceSynchronize());
  if constexpr (std::is_same<E, float>::value) {
    CUDA_CHECK(cudaMemcpy(out.mutable_data(), d.p, n * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<uint16_t> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), d.p, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out.mutable_data()[i] = bf16_to_f32(h[i]);
  }
  return out;
}
template <typename F>
auto dispatch(bool bf, F&& f) {
  if (bf) return f(bf16{});
  return f(float{});
}
// One sequence (slot 0, start, n tokens at rows 0..n-1) as device metadata.
struct OneSeq {
  std::unique_ptr<Dev> buf;
  g3cuda::SeqMeta seq;
  g3cuda::TokMeta tok;
  OneSeq(int start, int n) {
    std::vector<int32_t> h(4 + 2 * n);
    h[0] = 0; h[1] = start; h[2] = n; h[3] = 0;
    for (int i = 0; i < n; ++i) { h[4 + i] = start + i; h[4 + n + i] = 0; }
    buf = up_raw(h.data(), h.size() * 4);
    const int32_t* p = buf->as<int32_t>();
    seq = {p, p + 1, p + 2, p + 3};
    tok = {p + 4, p + 4 + n};
  }
};
}  // namespace

#ifdef G3_TRACE
namespace {
g3trace::Rec* g_trace_buf = nullptr;
constexpr size_t kTraceRecs = (size_t)g3trace::kRegions * g3trace::kSlots;
void trace_attach(g3trace::Rec* b) {
  for (auto f : g3trace::attachers()) CUDA_CHECK(f(b));
}
void trace_start() {
  if (!g_trace_buf) CUDA_CHECK(cudaMalloc(&g_trace_buf, sizeof(g3trace::Rec) * kTraceRecs));
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemset(g_trace_buf, 0, sizeof(g3trace::Rec) * kTraceRecs));
  trace_attach(g_trace_buf);
  CUDA_CHECK(cudaDeviceSynchronize());
}
py::bytes trace_stop() {
  if (!g_trace_buf) throw std::runtime_error("trace_stop: trace_start was not called");
  CUDA_CHECK(cudaDeviceSynchronize());
  trace_attach(nullptr);
  std::vector<g3trace::Rec> all(kTraceRecs);
  CUDA_CHECK(cudaMemcpy(all.data(), g_trace_buf, sizeof(g3trace::Rec) * kTraceRecs, cudaMemcpyDeviceToHost));
  std::string out;
  for (const auto& r : all)
    if (r.t1) out.append(reinterpret_cast<const char*>(&r), sizeof r);
  return py::bytes(out);
}
}  // namespace
#endif

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "gemma3-native CUDA backend";
  py::module_::import("gemma3_native._core");  // registers ModelConfig, shared with this module

  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n;
  });
  m.def("device_name", [](int i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) throw std::runtime_error("no CUDA device " + std::to_string(i));
    return std::string(p.name);
  }, py::arg("i") = 0);
  m.def("cublas_ok", []() {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return false;
    cublasDestroy(h);
    return true;
  });
  m.def("mem_info", []() {
    size_t f = 0, t = 0;
    CUDA_CHECK(cudaMemGetInfo(&f, &t));
    return py::make_tuple(f, t);
  });
  m.attr("SAMPLE_MAX_K") = g3cuda::kSampleMaxK;
  m.attr("SAMPLE_NARROW_MAX_V") = g3cuda::kSampleNarrowMaxV;
  m.def("clock_rate_khz", []() {  // the SM clock that clock64() counts (as the driver reports it)
    int dev = 0, khz = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
    return khz;
  });
  m.def("set_decode_kernel", [](int v) { g3cuda::decode_kernel_mode() = v; });
  m.def("set_gemv_mode", [](int v) { g3cuda::gemv_mode() = v; });
  m.def("gemv_mode", []() { return g3cuda::gemv_mode(); });
  m.def("set_decode_cluster_push", [](int v) { g3cuda::decode_cluster_push() = v; });
  m.def("decode_cluster_push", []() { return g3cuda::decode_cluster_push(); });
  // The kernel timeline (csrc/cuda/trace.cuh; bench/gpu/trace_decode.py): only in a GEMMA3_TRACE build.
#ifdef G3_TRACE
  m.def("trace_available", []() { return true; });
  m.def("trace_start", []() { trace_start(); }, "record kernel blocks from now on (clears the table)");
  m.def("trace_stop", []() { return trace_stop(); },
        "stop recording; the records held (bytes of 80-byte records, trace.cuh's Rec)");
#else
  m.def("trace_available", []() { return false; });
#endif
  m.def("gemv_shape", [](int M, int N, int K, bool geglu, bool fused) {
    const g3cuda::GemvShape g = g3cuda::gemv_shape(M, N, K, geglu, fused);
    return py::make_tuple(g.wpr, g.blocks, g.resident);
  }, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("geglu") = false, py::arg("fused") = false,
        "the decode GEMV's launch: (warps per row, blocks, blocks resident at once)");
  m.def("gemv_qkv_rope_supported", &g3cuda::gemv_qkv_rope_supported);
  m.def("gemv_qkv_rope_max_clusters", &g3cuda::gemv_qkv_rope_max_clusters);
  m.def("decode_cluster_supported", []() { return g3cuda::attention_decode_cluster_supported(); },
        "the device has thread-block clusters (the decode attention's cluster combine)");
  m.def("pdl_enabled", []() { return g3cuda::pdl_flag() != 0; });
  m.def("set_pdl", [](bool on) { g3cuda::pdl_flag() = on ? 1 : 0; },
        "programmatic dependent launch on/off (graphs captured before keep their setting)");
  m.def("pdl_prologue_enabled", []() { return g3cuda::pdl_prologue(); });
  m.def("set_pdl_prologue", [](bool on) { g3cuda::pdl_prologue_flag() = on ? 1 : 0; },
        "the kernels' PDL prologues (loads of constant inputs before the wait for the kernel before) on/off "
        "(graphs captured before keep their setting)");

  py::class_<CudaEngine> cuda_engine(m, "CudaEngine");
  bind_engine_common(cuda_engine);
  cuda_engine
      .def_property_readonly("device_bytes", &CudaEngine::device_bytes)
      .def_property_readonly("graphs_captured", &CudaEngine::graphs_captured)
      .def_readwrite("use_graphs", &CudaEngine::use_graphs)
      .def_readwrite("attention_path", &CudaEngine::attention_path)
      .def_readwrite("decode_max_splits", &CudaEngine::decode_max_splits)
      .def_readwrite("fuse_qk_attention", &CudaEngine::fuse_qk_attention)
      .def_readwrite("decode_cluster", &CudaEngine::decode_cluster)
      .def_readwrite("decode_cluster_max_keys", &CudaEngine::decode_cluster_max_keys)
      .def_readwrite("fuse_residual_gemv", &CudaEngine::fuse_residual_gemv)
      .def_readwrite("fuse_qkv_rope", &CudaEngine::fuse_qkv_rope)
      .def_readwrite("gate_up_l2_prefetch_kb", &CudaEngine::gate_up_l2_prefetch_kb)
      .def_readonly("l2_prefetch_forwards", &CudaEngine::l2_prefetch_forwards)
      .def_readwrite("qkv_rope_max_hidden", &CudaEngine::qkv_rope_max_hidden)
      .def("time_graph_replays", &CudaEngine::time_graph_replays, py::arg("B"), py::arg("n"))
      .def_readonly("qkv_rope_forwards", &CudaEngine::qkv_rope_forwards)
      .def_readwrite("pdl_early_trigger", &CudaEngine::pdl_early_trigger)
      .def_readwrite("gemm_path", &CudaEngine::gemm_path)
      .def_readwrite("repeat_mask", &CudaEngine::repeat_mask)
      .def_readwrite("skip_mask", &CudaEngine::skip_mask)
      .def_readwrite("persistent_decode", &CudaEngine::persistent_decode)
      .def_readonly("persistent_launches", &CudaEngine::persistent_launches)
      .def("persistent_decode_ok", &CudaEngine::persistent_decode_ok)
      .def_readwrite("trace_persistent", &CudaEngine::trace_persistent)
      .def("persistent_trace", &CudaEngine::persistent_trace)
      .def("clear_graphs", &CudaEngine::clear_graphs)
      .def("finalize", [](CudaEngine& e) { py::gil_scoped_release nogil; e.finalize(); });

  bind_vision_cuda(m);  // bindings_vision_cuda.cu: CudaVisionEncoder, vision kernels
  // ---- kernels on numpy arrays (tests) ----
  m.def("k_embedding", [](f32arr table, i32arr ids, float scale, py::object norm_w, float eps, bool bf) {
    need(table.ndim() == 2, "k_embedding: table [V, H]");
    const int n = (int)ids.size(), H = (int)table.shape(1);
    return dispatch(bf, [&](auto tag) {
      using E = decltype(tag);
      auto dt = up<E>(table);
      auto di = up_raw(ids.data(), (size_t)n * 4);
      Dev x((size_t)n * H * 4), xn((size_t)n * H * sizeof(E));
      std::unique_ptr<Dev> dw;
      if (!norm_w.is_none()) dw = up<float>(norm_w.cast<f32arr>());
      g3cuda::embedding_rmsnorm<E>(x.as<float>(), xn.as<E>(), dt->template as<E>(), di->as<int32_t>(), n, H, scale,
                                   dw ? dw->as<float>() : nullptr, eps, 0);
      py::object xo = down<float>(x, {n, H});
      py::object xno = dw ? py::object(down<E>(xn, {n, H})) : py::object(py::none());
      return py::make_tuple(xo, xno);
    });
  });
  m.def("k_rmsnorm", [](f32arr x, f32arr w, float eps, bool bf) {
    need(x.ndim() == 2 && w.size() == x.shape(1), "k_rmsnorm: x [rows, dim], w [dim]");
    const int rows = (int)x.shape(0), dim = (int)x.shape(1);
    return dispatch(bf, [&](auto tag) {
      using E = decltype(tag);
      auto dx = up<float>(x);
      auto dw = up<float>(w);
      Dev o((size_t)rows * dim * sizeof(E));
      g3cuda::rmsnorm<E>(o.as<E>(), dx->as<float>(), dw->as<float>(), rows, dim, eps, 0);
      return down<E>(o, {rows, dim});
    });
  });
  m.def("k_residual_rmsnorm", [](f32arr resid, f32arr delta, py::object post_w, f32arr next_w, float eps, bool bf) {
    need(resid.ndim() == 2 && delta.ndim() == 2 && resid.size() == delta.size(), "k_residual_rmsnorm: shapes");
    const int rows = (int)resid.shape(0), dim = (int)resid.shape(1);
    return dispatch(bf, [&](auto tag) {
      using E = decltype(tag);
      auto dr = up<float>(resid);
      auto dd = up<float>(delta);
      auto dn = up<float>(next_w);
      std::unique_ptr<Dev> dp;
      if (!post_w.is_none()) dp = up<float>(post_w.cast<f32arr>());
      Dev o((size_t)rows * dim * sizeof(E));
      g3cuda::residual_rmsnorm<E>(dr->as<float>(), o.as<E>(), dd->as<float>(), dp ? dp->as<float>() : nullptr,
                                  dn->as<float>(), rows, dim, eps, 0);
      return py::make_tuple(down<float>(*dr, {rows, dim}), down<E>(o, {rows, dim}));
    });
  });
  m.def("k_qk_rope", [](f32arr qkv, int start, int NH, int KVH, int D, py::object q_w, py::object k_w, float theta,
                        float factor, float eps, bool bf) {
    need(qkv.ndim() == 2 && qkv.shape(1) == (NH + 2 * KVH) * D, "k_qk_rope: qkv [T, (NH + 2 KVH) D]");
    const int T = (int)qkv.shape(0);
    const std::vector<float> inv = g3::rope_inv_freq(D, theta, factor);
    return dispatch(bf, [&](auto tag) {
      using E = decltype(tag);
      OneSeq one(start, T);
      auto dq = up<float>(qkv);
      auto dinv = up<float>(inv.data(), inv.size());
      std::unique_ptr<Dev> dqw, dkw;
      if (!q_w.is_none()) dqw = up<float>(q_w.cast<f32arr>());
      if (!k_w.is_none()) dkw = up<float>(k_w.cast<f32arr>());
      const int cap = start + T;
      Dev q((size_t)T * NH * D * sizeof(E)), k((size_t)T * KVH * D * sizeof(E)), v((size_t)T * KVH * D * sizeof(E));
      Dev kc((size_t)KVH * cap * D * sizeof(E)), vc((size_t)KVH * cap * D * sizeof(E));
      g3cuda::qk_rope_kv<E>(q.as<E>(), k.as<E>(), v.as<E>(), kc.as<E>(), vc.as<E>(), dq->as<float>(),
                            dqw ? dqw->as<float>() : nullptr, dkw ? dkw->as<float>() : nullptr, dinv->as<float>(),
                            one.tok, one.seq, T, NH, KVH, D, cap, false, eps, 0);
      return py::make_tuple(down<E>(q, {T, NH, D}), down<E>(k, {T, KVH, D}), down<E>(v, {T, KVH, D}));
    });
  });
  // path: "generic", "tc" (bf16, D 128/256) or "decode" / "decode_warp" / "decode_tc" (n == 1; nsplit splits)
  // or "decode_tc_cluster" (the tensor-core kernel with its nsplit <= 8 splits as a thread-block cluster)
  m.def("k_attention", [](f32arr q, f32arr k_new, f32arr v_new, f32arr k_cache, f32arr v_cache, int start, int window,
                          float scale, float softcap, bool bf, const std::string& path, int nsplit) {
    need(q.ndim() == 3 && k_new.ndim() == 3 && k_cache.ndim() == 3, "k_attention: 3-D arrays");
    const int n = (int)q.shape(0), NH = (int)q.shape(1), D = (int)q.shape(2), KVH = (int)k_new.shape(1);
    const int cap = (int)k_cache.shape(1);
    const bool local = window > 0;
    return dispatch(bf, [&](auto tag) {
      using E = decltype(tag);
      OneSeq one(start, n);
      auto dq = up<E>(q);
      auto dk = up<E>(k_new);
      auto dv = up<E>(v_new);
      auto dkc = up<E>(k_cache);
      auto dvc = up<E>(v_cache);
      Dev out((size_t)n * NH * D * sizeof(E));
      E *kc = dkc->template as<E>(), *vc = dvc->template as<E>();
      const E *kn = dk->template as<E>(), *vn = dv->template as<E>();
      g3cuda::kv_cache_write<E>(kc, vc, kn, vn, one.tok, one.seq, n, KVH, D, cap, local, 0, 0);
      if (path == "decode_tc_cluster") {
        need(std::is_same<E, bf16>::value && g3cuda::attention_decode_tc_supported(NH, KVH, D),
             "decode_tc_cluster takes bf16, head_dim 128/256, at most 8 query heads per kv head");
        need(n == 1, "decode attention takes one query");
        if constexpr (std::is_same<E, bf16>::value)
          g3cuda::attention_decode_tc(out.as<bf16>(), dq->template as<bf16>(), kc, vc, one.seq, 1, NH, KVH, D, cap,
                                      window, scale, softcap, nsplit, nullptr, nullptr, 0, true);
        CUDA_CHECK(cudaDeviceSynchronize());
      } else if (path == "decode" || path == "decode_warp" || path == "decode_tc") {
        struct Mode {  // decode_warp: the warp-per-key kernel for every type and head dim
          int saved = g3cuda::decode_kernel_mode();
          ~Mode() { g3cuda::decode_kernel_mode() = saved; }
        } mode;
        // "decode": lanes-over-keys where it applies; "decode_tc": the tensor-core kernel (bf16 only)
        g3cuda::decode_kernel_mode() = path == "decode_warp" ? 1 : path == "decode_tc" ? 2 : 0;
        if (path == "decode_tc") {
          need(std::is_same<E, bf16>::value && g3cuda::attention_decode_tc_supported(NH, KVH, D),
               "decode_tc takes bf16, head_dim 128/256, at most 8 query heads per kv head");
        }
        need(n == 1, "decode attention takes one query");
        Dev part(g3cuda::attention_decode_workspace_floats(1, NH, D, nsplit) * 4);
        Dev cnt((size_t)KVH * 4);
        CUDA_CHECK(cudaMemset(cnt.p, 0, (size_t)KVH * 4));
        g3cuda::attention_decode<E>(out.as<E>(), dq->template as<E>(), kc, vc, one.seq, 1, NH, KVH, D, cap, window,
                                    scale, softcap, nsplit, part.as<float>(), cnt.as<unsigned>(), 0);
        std::vector<unsigned> c(KVH);
        CUDA_CHECK(cudaMemcpy(c.data(), cnt.p, (size_t)KVH * 4, cudaMemcpyDeviceToHost));
        for (unsigned x : c) need(x == 0, "decode attention left a counter non-zero");
      } else if (path == "tc") {
        if constexpr (std::is_same<E, bf16>::value) {
          std::vector<int2> tiles;
          for (int q0 = 0; q0 < n; q0 += 64) tiles.push_back(make_int2(0, q0));
          auto dt = up_raw(tiles.data(), tiles.size() * sizeof(int2));
          g3cuda::attention_prefill_tc(out.as<bf16>(), dq->template as<bf16>(), kn, vn, kc, vc, one.seq,
                                       dt->as<int2>(), (int)tiles.size(), NH, KVH, D, cap, window, scale, softcap, 0);
          CUDA_CHECK(cudaDeviceSynchronize());
        } else {
          throw py::value_error("the tensor-core path takes bf16");
        }
      } else {
        g3cuda::attention_generic<E>(out.as<E>(), dq->template as<E>(), kn, vn, kc, vc, one.tok, one.seq, n, NH, KVH, D,
                                     cap, window, scale, softcap, 0);
      }
      g3cuda::kv_cache_write<E>(kc, vc, kn, vn, one.tok, one.seq, n, KVH, D, cap, local, 1, 0);
      return py::make_tuple(down<E>(out, {n, NH, D}), down<E>(*dkc, {KVH, cap, D}), down<E>(*dvc, {KVH, cap, D}));
    });
  }, py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_cache"), py::arg("v_cache"), py::arg("start"),
     py::arg("window"), py::arg("scale"), py::arg("softcap"), py::arg("bf16"), py::arg("path"), py::arg("nsplit") = 4);
  // Microbenchmark of the decode attention kernel alone (bf16): us per launch, hot caches, or with a
  // 256 MB copy between launches (L2 and instruction caches cold, as in a decode step where the
  // weights stream through L2). Returns (hot_us, cold_us, copy_only_us).
  m.def("bench_decode_attention", [](int NH, int KVH, int D, int start, int window, int cap, int nsplit, int iters,
                                     bool cluster) {
    const size_t kvn = (size_t)KVH * cap * D;
    Dev kc(kvn * 2), vc(kvn * 2), q((size_t)NH * D * 2), out((size_t)NH * D * 2);
    CUDA_CHECK(cudaMemset(kc.p, 0x3c, kvn * 2));
    CUDA_CHECK(cudaMemset(vc.p, 0x3c, kvn * 2));
    CUDA_CHECK(cudaMemset(q.p, 0x3c, (size_t)NH * D * 2));
    OneSeq one(start, 1);
    Dev part(g3cuda::attention_decode_workspace_floats(1, NH, D, nsplit) * 4), cnt((size_t)KVH * 4);
    CUDA_CHECK(cudaMemset(cnt.p, 0, (size_t)KVH * 4));
    const size_t fl = 256u << 20;
    Dev f1(fl), f2(fl);
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreate(&s));
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    auto attn = [&]() {
      if (cluster) {  // the splits as one thread-block cluster (nsplit <= 8)
        g3cuda::attention_decode_tc(out.as<bf16>(), q.as<bf16>(), kc.as<bf16>(), vc.as<bf16>(), one.seq, 1, NH, KVH, D,
                                    cap, window, 0.0625f, 0.f, nsplit, nullptr, nullptr, s, true);
        return;
      }
      g3cuda::attention_decode<bf16>(out.as<bf16>(), q.as<bf16>(), kc.as<bf16>(), vc.as<bf16>(), one.seq, 1, NH, KVH, D,
                                     cap, window, 0.0625f, 0.f, nsplit, part.as<float>(), cnt.as<unsigned>(), s);
    };
    auto flush = [&]() { CUDA_CHECK(cudaMemcpyAsync(f2.p, f1.p, fl, cudaMemcpyDeviceToDevice, s)); };
    auto timeit = [&](bool a, bool f) {
      for (int i = 0; i < 3; ++i) { if (f) flush(); if (a) attn(); }
      CUDA_CHECK(cudaEventRecord(e0, s));
      for (int i = 0; i < iters; ++i) { if (f) flush(); if (a) attn(); }
      CUDA_CHECK(cudaEventRecord(e1, s));
      CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      return ms * 1e3 / iters;
    };
    const double hot = timeit(true, false), cold = timeit(true, true), copy = timeit(false, true);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(s);
    return py::make_tuple(hot, cold, copy);
  }, py::arg("NH"), py::arg("KVH"), py::arg("D"), py::arg("start"), py::arg("window"), py::arg("cap"), py::arg("nsplit"),
     py::arg("iters"), py::arg("cluster") = false);
  m.def("k_geglu", [](f32arr gu, bool bf) {
    need(gu.ndim() == 2 && gu.shape(1) % 2 == 0, "k_geglu: [rows, 2F]");
    const int rows = (int)gu.shape(0), F = (int)gu.shape(1) / 2;
    return dispatch(bf, [&](auto tag) {
      using E = decltype(tag);
      auto dg = up<float>(gu);
      Dev o((size_t)rows * F * sizeof(E));
      g3cuda::geglu<E>(o.as<E>(), dg->as<float>(), rows, F, 0);
      return down<E>(o, {rows, F});
    });
  });
  // path: 0 auto, 1 GEMV, 2 cuBLAS
  m.def("k_gemm", [](f32arr x, f32arr w, bool bf, int path) {
    need(x.ndim() == 2 && w.ndim() == 2 && x.shape(1) == w.shape(1), "k_gemm: x [M, K], w [N, K]");
    const int M = (int)x.shape(0), K = (int)x.shape(1), N = (int)w.shape(0);
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
    try {
      auto r = dispatch(bf, [&](auto tag) {
        using E = decltype(tag);
        auto dx = up<E>(x);
        auto dw = up<E>(w);
        Dev o((size_t)M * N * 4);
        g3cuda::gemm(h, o.as<float>(), dx->p, dw->p, bf, M, K, N, path, 0);
        return down<float>(o, {M, N});
      });
      cublasDestroy(h);
      return r;
    } catch (...) {
      cublasDestroy(h);
      throw;
    }
  });
  m.def("gemv_supported", &g3cuda::gemv_supported);
  // The residual step fused ahead of the bf16 GEMV (gemv_residual): returns (out, the new residual), out
  // float32 [M, N] (geglu: bf16 act [M, F], w = [gate; up] [2F, K])
  m.def("k_gemv_residual", [](f32arr resid, f32arr delta, py::object post_w, f32arr next_w, f32arr w, float eps,
                              bool geglu) {
    need(resid.ndim() == 2 && delta.ndim() == 2 && resid.size() == delta.size() && w.ndim() == 2 &&
             w.shape(1) == resid.shape(1) && next_w.size() == resid.shape(1),
         "k_gemv_residual: resid, delta [M, K], next_w [K], w [N, K]");
    const int M = (int)resid.shape(0), K = (int)resid.shape(1), N = (int)w.shape(0);
    need(!geglu || N % 2 == 0, "k_gemv_residual: geglu needs w = [gate; up]");
    auto dr = up<float>(resid);
    auto dd = up<float>(delta);
    auto dn = up<float>(next_w);
    auto dw = up<bf16>(w);
    std::unique_ptr<Dev> dp;
    if (!post_w.is_none()) dp = up<float>(post_w.cast<f32arr>());
    Dev ro((size_t)M * K * 4);
    const g3cuda::GemvResidual rn{dd->as<float>(), dr->as<float>(), ro.as<float>(), dp ? dp->as<float>() : nullptr,
                                  dn->as<float>(), eps};
    if (geglu) {
      Dev act((size_t)M * (N / 2) * sizeof(bf16));
      g3cuda::gemv_residual_geglu(act.as<bf16>(), rn, dw->as<bf16>(), M, K, N / 2, 0);
      return py::make_tuple(down<bf16>(act, {M, N / 2}), down<float>(ro, {M, K}));
    }
    Dev o((size_t)M * N * 4);
    g3cuda::gemv_residual(o.as<float>(), rn, dw->as<bf16>(), M, K, N, 0);
    return py::make_tuple(down<float>(o, {M, N}), down<float>(ro, {M, K}));
  });
  // The qkv product with QK-norm, RoPE and the cache write (gemv_qkv_rope), bf16. Token m is the one new
  // token of sequence m (cache slot m) at position pos[m]. x [M, K] (bf16-rounded on the way in), or with
  // resid given, the residual step (resid, delta, post_w, next_w) made inside as gemv_residual does. k_cache /
  // v_cache [M, KVH, cap, D]: the caches before. Returns (q, k_new, v_new, k_cache, v_cache, new residual or
  // None) as float32.
  m.def("k_gemv_qkv_rope", [](f32arr x, py::object resid, py::object delta, py::object post_w, py::object next_w,
                              f32arr w, int NH, int KVH, int D, py::object q_w, py::object k_w, float theta,
                              float factor, i32arr pos, bool local, f32arr k_cache, f32arr v_cache, float eps) {
    need(w.ndim() == 2 && w.shape(0) == (NH + 2 * KVH) * D, "k_gemv_qkv_rope: w [(NH + 2 KVH) D, K]");
    const int M = (int)pos.size(), K = (int)w.shape(1);
    need(x.ndim() == 2 && x.shape(0) == M && x.shape(1) == K, "k_gemv_qkv_rope: x [M, K], M = len(pos)");
    need(k_cache.ndim() == 4 && k_cache.shape(0) == M && k_cache.shape(1) == KVH && k_cache.shape(3) == D &&
             v_cache.size() == k_cache.size(),
         "k_gemv_qkv_rope: caches [M, KVH, cap, D]");
    need(g3cuda::gemv_qkv_rope_supported(M, K, D), "k_gemv_qkv_rope: not supported here");
    const int cap = (int)k_cache.shape(2);
    const std::vector<float> inv = g3::rope_inv_freq(D, theta, factor);
    std::vector<int32_t> h(4 * M + 2 * M);  // slot, start, len, t0 per sequence; pos, seq per token
    for (int b = 0; b < M; ++b) {
      h[b] = b; h[M + b] = pos.data()[b]; h[2 * M + b] = 1; h[3 * M + b] = b;
      h[4 * M + b] = pos.data()[b]; h[5 * M + b] = b;
    }
    auto meta = up_raw(h.data(), h.size() * 4);
    const int32_t* p = meta->as<int32_t>();
    auto dx = up<bf16>(x);
    auto dw = up<bf16>(w);
    auto dinv = up<float>(inv.data(), inv.size());
    auto dkc = up<bf16>(k_cache);
    auto dvc = up<bf16>(v_cache);
    std::unique_ptr<Dev> dqw, dkw, dr, dd, dp, dn, ro;
    if (!q_w.is_none()) dqw = up<float>(q_w.cast<f32arr>());
    if (!k_w.is_none()) dkw = up<float>(k_w.cast<f32arr>());
    Dev q((size_t)M * NH * D * 2), k((size_t)M * KVH * D * 2), v((size_t)M * KVH * D * 2);
    const g3cuda::QkvRope a{q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), dkc->as<bf16>(), dvc->as<bf16>(),
                            dqw ? dqw->as<float>() : nullptr, dkw ? dkw->as<float>() : nullptr, dinv->as<float>(),
                            g3cuda::TokMeta{p + 4 * M, p + 5 * M}, g3cuda::SeqMeta{p, p + M, p + 2 * M, p + 3 * M},
                            NH, KVH, D, K, cap, local, eps};
    g3cuda::GemvResidual rn;
    if (!resid.is_none()) {
      const f32arr r = resid.cast<f32arr>(), d = delta.cast<f32arr>(), nw = next_w.cast<f32arr>();
      need(r.size() == (py::ssize_t)M * K && d.size() == r.size() && nw.size() == K,
           "k_gemv_qkv_rope: resid, delta [M, K], next_w [K]");
      dr = up<float>(r);
      dd = up<float>(d);
      dn = up<float>(nw);
      if (!post_w.is_none()) dp = up<float>(post_w.cast<f32arr>());
      ro = std::make_unique<Dev>((size_t)M * K * 4);
      rn = g3cuda::GemvResidual{dd->as<float>(), dr->as<float>(), ro->as<float>(), dp ? dp->as<float>() : nullptr,
                                dn->as<float>(), eps};
    }
    g3cuda::gemv_qkv_rope(a, dx->as<bf16>(), dw->as<bf16>(), M, ro ? &rn : nullptr, 0);
    py::object r_out = py::none();
    if (ro) r_out = down<float>(*ro, {M, K});
    return py::make_tuple(down<bf16>(q, {M, NH, D}), down<bf16>(k, {M, KVH, D}), down<bf16>(v, {M, KVH, D}),
                          down<bf16>(*dkc, {M, KVH, cap, D}), down<bf16>(*dvc, {M, KVH, cap, D}), r_out);
  });
  // act = gelu_tanh(x . Wgate^T) * (x . Wup^T), w = [gate; up] [2F, K]; path as k_gemm
  m.def("k_gemm_geglu", [](f32arr x, f32arr w, bool bf, int path) {
    need(x.ndim() == 2 && w.ndim() == 2 && x.shape(1) == w.shape(1) && w.shape(0) % 2 == 0, "k_gemm_geglu: shapes");
    const int M = (int)x.shape(0), K = (int)x.shape(1), F = (int)w.shape(0) / 2;
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
    try {
      auto r = dispatch(bf, [&](auto tag) {
        using E = decltype(tag);
        auto dx = up<E>(x);
        auto dw = up<E>(w);
        Dev act((size_t)M * F * sizeof(E)), gu((size_t)M * 2 * F * 4);
        g3cuda::gemm_geglu<E>(h, act.as<E>(), gu.as<float>(), dx->template as<E>(), dw->template as<E>(), M, K, F,
                              path, 0);
        return down<E>(act, {M, F});
      });
      cublasDestroy(h);
      return r;
    } catch (...) {
      cublasDestroy(h);
      throw;
    }
  });
  m.def("k_softcap", [](f32arr x, float cap) {
    auto d = up<float>(x);
    g3cuda::softcap(d->as<float>(), x.size(), cap, 0);
    return down<float>(*d, std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  });
  // graph_replays 0: one plain call. > 0: the call captured in a CUDA graph (which fails on any sync or
  // allocation inside), replayed that many times on the same inputs; returns (ids of the last replay,
  // microseconds per replay). Both check that the workspace is left zeroed.
  auto k_sample = [](f32arr logits, f32arr temperature, i32arr top_k, f32arr top_p, u64arr seed, u64arr counter,
                     bool many_block_argmax, int graph_replays) {
    need(logits.ndim() == 2, "k_sample: logits [B, V]");
    const int B = (int)logits.shape(0), V = (int)logits.shape(1);
    need(temperature.size() == B && top_k.size() == B && top_p.size() == B && seed.size() == B && counter.size() == B,
         "k_sample: one parameter each per row");
    int searches = 0;
    for (int b = 0; b < B; ++b)
      searches = std::max(searches, g3cuda::sample_searches(temperature.data()[b], top_k.data()[b], top_p.data()[b], V));
    need(many_block_argmax || searches == 0, "k_sample: rows wider than SAMPLE_MAX_K need the workspace");
    auto dl = up<float>(logits);
    auto dt = up_raw(temperature.data(), (size_t)B * 4);
    auto dk = up_raw(top_k.data(), (size_t)B * 4);
    auto dp = up_raw(top_p.data(), (size_t)B * 4);
    auto ds = up_raw(seed.data(), (size_t)B * 8);
    auto dc = up_raw(counter.data(), (size_t)B * 8);
    const size_t wsb = g3cuda::sample_workspace_bytes(B, V), wsz = g3cuda::sample_workspace_zeroed_bytes(B);
    Dev ids((size_t)B * 4), ws(wsb);
    CUDA_CHECK(cudaMemset(ws.p, 0, wsb));
    CUDA_CHECK(cudaMemset(ids.p, 0xff, (size_t)B * 4));
    cudaStream_t st;
    CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    auto call = [&]() {
      g3cuda::sample(ids.as<int32_t>(), dl->as<float>(), B, V, dt->as<float>(), dk->as<int32_t>(), dp->as<float>(),
                     ds->as<uint64_t>(), dc->as<uint64_t>(), many_block_argmax ? ws.p : nullptr, B, searches, st);
    };
    double us = 0.0;
    if (graph_replays <= 0) {
      call();
    } else {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t ge = nullptr;
      CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      call();
      CUDA_CHECK(cudaStreamEndCapture(st, &g));
      CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
      CUDA_CHECK(cudaGraphLaunch(ge, st));  // warm-up
      cudaEvent_t e0, e1;
      CUDA_CHECK(cudaEventCreate(&e0));
      CUDA_CHECK(cudaEventCreate(&e1));
      CUDA_CHECK(cudaEventRecord(e0, st));
      for (int i = 0; i < graph_replays; ++i) CUDA_CHECK(cudaGraphLaunch(ge, st));
      CUDA_CHECK(cudaEventRecord(e1, st));
      CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0.f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      us = 1000.0 * ms / graph_replays;
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
      cudaGraphExecDestroy(ge);
      cudaGraphDestroy(g);
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
    CUDA_CHECK(cudaStreamDestroy(st));
    std::vector<unsigned char> w(wsz);
    CUDA_CHECK(cudaMemcpy(w.data(), ws.p, wsz, cudaMemcpyDeviceToHost));
    for (unsigned char v : w) need(v == 0, "k_sample: the sampler's workspace was not left zeroed");
    py::array_t<int32_t> out(B);
    CUDA_CHECK(cudaMemcpy(out.mutable_data(), ids.p, (size_t)B * 4, cudaMemcpyDeviceToHost));
    return std::make_pair(out, us);
  };
  m.def("k_sample", [k_sample](f32arr logits, f32arr temperature, i32arr top_k, f32arr top_p, u64arr seed,
                               u64arr counter, bool many_block_argmax) {
    return k_sample(logits, temperature, top_k, top_p, seed, counter, many_block_argmax, 0).first;
  }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"), py::arg("counter"),
     py::arg("many_block_argmax") = true);
  m.def("k_sample_graph", [k_sample](f32arr logits, f32arr temperature, i32arr top_k, f32arr top_p, u64arr seed,
                                     u64arr counter, int replays) {
    need(replays > 0, "k_sample_graph: replays > 0");
    auto r = k_sample(logits, temperature, top_k, top_p, seed, counter, true, replays);
    return py::make_tuple(r.first, r.second);
  }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"), py::arg("counter"),
     py::arg("replays"));
}
