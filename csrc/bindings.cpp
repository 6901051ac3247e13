// bindings.cpp: the Python module gemma3_native._core: ModelConfig, the CPU engine, and each CPU
// kernel on numpy arrays (the kernels are exposed so the tests can check them against numpy).
// bfloat16 arrays travel as uint16 bit patterns.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind_common.h"
#include "config.h"
#include "cpu/kernels.h"
#include "engine_cpu.h"

namespace py = pybind11;
using namespace g3;

void bind_vision(py::module_& m);  // bindings_vision.cpp

PYBIND11_MODULE(_core, m) {
  m.doc() = "gemma3-native compiled core (CPU backend)";

  py::enum_<Family>(m, "Family").value("Gemma1", Family::Gemma1).value("Gemma2", Family::Gemma2).value("Gemma3", Family::Gemma3);
  py::enum_<AttentionType>(m, "AttentionType").value("Global", AttentionType::Global).value("Local", AttentionType::Local);
  py::enum_<QueryScale>(m, "QueryScale")
      .value("InvSqrtHeadDim", QueryScale::InvSqrtHeadDim)
      .value("InvSqrtQueryPreAttnScalar", QueryScale::InvSqrtQueryPreAttnScalar);
  py::enum_<PostNorm>(m, "PostNorm").value("None_", PostNorm::None).value("AttnAndFfw", PostNorm::AttnAndFfw);
  py::enum_<QKNorm>(m, "QKNorm").value("None_", QKNorm::None).value("RMSNorm", QKNorm::RMSNorm);
  py::enum_<Activation>(m, "Activation").value("GeluTanh", Activation::GeluTanh);
  py::enum_<RopeScaling>(m, "RopeScaling").value("None_", RopeScaling::None).value("Linear", RopeScaling::Linear);

  py::class_<RopeConfig>(m, "RopeConfig")
      .def(py::init<>())
      .def_readwrite("theta", &RopeConfig::theta)
      .def_readwrite("scaling", &RopeConfig::scaling)
      .def_readwrite("factor", &RopeConfig::factor);

  py::class_<ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("family", &ModelConfig::family)
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_layers", &ModelConfig::num_layers)
      .def_readwrite("num_heads", &ModelConfig::num_heads)
      .def_readwrite("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("sliding_window", &ModelConfig::sliding_window)
      .def_readwrite("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("query_scale", &ModelConfig::query_scale)
      .def_readwrite("query_pre_attn_scalar", &ModelConfig::query_pre_attn_scalar)
      .def_readwrite("attn_logit_softcap", &ModelConfig::attn_logit_softcap)
      .def_readwrite("final_logit_softcap", &ModelConfig::final_logit_softcap)
      .def_readwrite("post_norm", &ModelConfig::post_norm)
      .def_readwrite("qk_norm", &ModelConfig::qk_norm)
      .def_readwrite("activation", &ModelConfig::activation)
      .def_readwrite("layer_types", &ModelConfig::layer_types)
      .def_readwrite("rope_local", &ModelConfig::rope_local)
      .def_readwrite("rope_global", &ModelConfig::rope_global)
      .def_readwrite("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_property_readonly("attn_scale", &ModelConfig::attn_scale)
      .def("validate", &ModelConfig::validate);

  py::class_<CpuEngine> cpu_engine(m, "CpuEngine");
  bind_engine_common(cpu_engine);

  // ---- kernels on numpy arrays (for tests and microbenchmarks) ----
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
  });
  m.def("embedding", [](py::array table, i32arr ids, float scale) {
    WeightView w = matrix_view(table, "table");
    py::array_t<float> out({(py::ssize_t)ids.size(), (py::ssize_t)w.cols});
    embedding_cpu(out.mutable_data(), w, ids.data(), (int)ids.size(), scale);
    return out;
  });
  m.def("rmsnorm", [](f32arr x, f32arr w, float eps) {
    need(x.ndim() == 2 && w.ndim() == 1 && w.shape(0) == x.shape(1), "rmsnorm: x [rows, dim], w [dim]");
    py::array_t<float> out({x.shape(0), x.shape(1)});
    rmsnorm_cpu(out.mutable_data(), x.shape(1), x.data(), x.shape(1), w.data(), (int)x.shape(0), (int)x.shape(1), eps);
    return out;
  });
  m.def("qk_norm", [](f32arr x, f32arr w, float eps) {  // x [rows, heads, head_dim]
    need(x.ndim() == 3 && w.ndim() == 1 && w.shape(0) == x.shape(2), "qk_norm: x [rows, heads, head_dim], w [head_dim]");
    auto o = py::array_t<float>({x.shape(0), x.shape(1), x.shape(2)});
    std::copy_n(x.data(), x.size(), o.mutable_data());
    qk_norm_cpu(o.mutable_data(), x.shape(1) * x.shape(2), w.data(), (int)x.shape(0), (int)x.shape(1), (int)x.shape(2), eps);
    return o;
  });
  m.def("residual_rmsnorm", [](f32arr resid, f32arr delta, py::object post_w, f32arr next_w, float eps) {
    need(resid.ndim() == 2 && delta.ndim() == 2 && resid.shape(0) == delta.shape(0) && resid.shape(1) == delta.shape(1),
         "residual_rmsnorm: resid and delta [rows, dim]");
    const int rows = (int)resid.shape(0), dim = (int)resid.shape(1);
    f32arr pw;
    if (!post_w.is_none()) pw = post_w.cast<f32arr>();
    auto r = py::array_t<float>({rows, dim});
    std::copy_n(resid.data(), resid.size(), r.mutable_data());
    auto out = py::array_t<float>({rows, dim});
    residual_rmsnorm_cpu(r.mutable_data(), out.mutable_data(), delta.data(), post_w.is_none() ? nullptr : pw.data(),
                         next_w.data(), rows, dim, eps);
    return py::make_tuple(r, out);
  });
  m.def("rope_inv_freq", [](int head_dim, float theta, float factor) {  // [head_dim / 2] float32
    need(head_dim >= 2 && head_dim % 2 == 0, "rope_inv_freq: head_dim must be even and positive");
    const std::vector<float> v = rope_inv_freq(head_dim, theta, factor);
    py::array_t<float> a((py::ssize_t)v.size());
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  }, py::arg("head_dim"), py::arg("theta"), py::arg("factor") = 1.f);
  m.def("rope", [](f32arr x, i32arr positions, float theta, float factor) {  // x [rows, heads, head_dim]
    need(x.ndim() == 3 && positions.size() == x.shape(0), "rope: x [rows, heads, head_dim], positions [rows]");
    auto o = py::array_t<float>({x.shape(0), x.shape(1), x.shape(2)});
    std::copy_n(x.data(), x.size(), o.mutable_data());
    rope_cpu(o.mutable_data(), x.shape(1) * x.shape(2), positions.data(), (int)x.shape(0), (int)x.shape(1),
             (int)x.shape(2), theta, factor);
    return o;
  });
  // attention of a chunk: q [n, H, D], k/v new [n, KVH, D], caches [KVH, cap, D] (modified in place by the
  // cache write when write=True).
  m.def("attention",
        [](f32arr q, f32arr k_new, f32arr v_new, py::array_t<float, py::array::c_style> k_cache,
           py::array_t<float, py::array::c_style> v_cache, int start, int window, float scale, float softcap, bool write,
           py::object extent) {
          need(q.ndim() == 3 && k_new.ndim() == 3 && v_new.ndim() == 3 && k_cache.ndim() == 3 && v_cache.ndim() == 3,
               "attention: 3-D arrays");
          const int n = (int)q.shape(0), H = (int)q.shape(1), D = (int)q.shape(2), KVH = (int)k_new.shape(1);
          const int cap = (int)k_cache.shape(1);
          need(k_new.shape(0) == n && v_new.shape(0) == n && k_new.shape(2) == D && H % KVH == 0, "attention: shapes");
          need(k_cache.shape(0) == KVH && k_cache.shape(2) == D && v_cache.shape(1) == cap, "attention: cache shapes");
          auto out = py::array_t<float>({n, H, D});
          std::vector<float> scratch(attention_cpu_scratch(std::min(cap, start) + n, H, KVH, D));
          i32arr ext;
          if (!extent.is_none()) {
            ext = extent.cast<i32arr>();
            need(ext.size() == n, "attention: extent needs one entry per query");
          }
          attention_cpu(out.mutable_data(), (int64_t)H * D, q.data(), (int64_t)H * D, k_new.data(), v_new.data(),
                        (int64_t)KVH * D, k_cache.data(), v_cache.data(), cap, start, n, H, KVH, D, window, scale,
                        softcap, ext.size() ? ext.data() : nullptr, scratch.data());
          if (write)
            kv_cache_write_cpu(k_cache.mutable_data(), v_cache.mutable_data(), k_new.data(), v_new.data(),
                               (int64_t)KVH * D, cap, start, n, KVH, D);
          return out;
        },
        py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_cache"), py::arg("v_cache"), py::arg("start"),
        py::arg("window"), py::arg("scale"), py::arg("softcap"), py::arg("write"), py::arg("extent") = py::none());
  m.def("geglu", [](f32arr gu) {
    need(gu.ndim() == 2 && gu.shape(1) % 2 == 0, "geglu: [rows, 2F]");
    const int F = (int)gu.shape(1) / 2;
    auto out = py::array_t<float>({(int)gu.shape(0), F});
    geglu_cpu(out.mutable_data(), gu.data(), (int)gu.shape(0), F);
    return out;
  });
  m.def("matmul", [](f32arr x, py::array w) {
    need(x.ndim() == 2, "matmul: x [T, K]");
    WeightView wv = matrix_view(w, "w");
    need(wv.cols == x.shape(1), "matmul: x is [T, " + std::to_string(x.shape(1)) + "], w is [" + std::to_string(wv.rows) +
                                    ", " + std::to_string(wv.cols) + "]");
    auto out = py::array_t<float>({x.shape(0), (py::ssize_t)wv.rows});
    {
      py::gil_scoped_release nogil;
      matmul_cpu(out.mutable_data(), x.data(), wv, (int)x.shape(0), (int)wv.cols, (int)wv.rows);
    }
    return out;
  });
  m.def("softcap", [](f32arr x, float cap) {
    auto out = py::array_t<float>(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    std::copy_n(x.data(), x.size(), out.mutable_data());
    softcap_cpu(out.mutable_data(), out.size(), cap);
    return out;
  });
  m.def("argmax", [](f32arr logits) {
    need(logits.ndim() == 2, "argmax: logits [B, V]");
    std::vector<int> ids(logits.shape(0));
    for (py::ssize_t b = 0; b < logits.shape(0); ++b) ids[b] = argmax_cpu(logits.data() + b * logits.shape(1), (int)logits.shape(1));
    return ids;
  });
  m.def("uniform_from", &uniform_from);
  m.def(
      "sample",
      [](f32arr logits, std::vector<float> temperature, std::vector<int> top_k, std::vector<float> top_p,
         std::vector<uint64_t> seed, std::vector<uint64_t> counter) {
        need(logits.ndim() == 2, "sample: logits [B, V]");
        const size_t B = logits.shape(0);
        need(temperature.size() == B && top_k.size() == B && top_p.size() == B && seed.size() == B && counter.size() == B,
             "sample: one temperature/top_k/top_p/seed/counter per row");
        std::vector<int> ids(B);
        py::gil_scoped_release nogil;
        for (size_t b = 0; b < B; ++b)
          ids[b] = sample_cpu(logits.data() + b * logits.shape(1), (int)logits.shape(1), temperature[b], top_k[b], top_p[b],
                              seed[b], counter[b]);
        return ids;
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"), py::arg("counter"));

  bind_vision(m);  // VisionConfig, VisionEncoderCpu, vision kernels
}
