// bindings_vision.cpp: the vision part of gemma3_native._core: VisionConfig, VisionEncoderCpu and the
// vision kernels on numpy arrays (for the tests). Called from bindings.cpp through bind_vision().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind_common.h"
#include "config.h"
#include "cpu/kernels.h"
#include "vision_cpu.h"

namespace py = pybind11;
using namespace g3;

namespace {
// pixel_values [n, C, S, S] checked against the config.
void check_pixels(const VisionConfig& c, const f32arr& px) {
  need(px.ndim() == 4 && px.shape(1) == c.num_channels && px.shape(2) == c.image_size && px.shape(3) == c.image_size,
       "pixel_values must be [n, " + std::to_string(c.num_channels) + ", " + std::to_string(c.image_size) + ", " +
           std::to_string(c.image_size) + "] float32");
}
}  // namespace

void bind_vision(py::module_& m) {
  py::class_<VisionConfig>(m, "VisionConfig")
      .def(py::init<>())
      .def_readwrite("hidden_size", &VisionConfig::hidden_size)
      .def_readwrite("intermediate_size", &VisionConfig::intermediate_size)
      .def_readwrite("num_layers", &VisionConfig::num_layers)
      .def_readwrite("num_heads", &VisionConfig::num_heads)
      .def_readwrite("num_channels", &VisionConfig::num_channels)
      .def_readwrite("image_size", &VisionConfig::image_size)
      .def_readwrite("patch_size", &VisionConfig::patch_size)
      .def_readwrite("layer_norm_eps", &VisionConfig::layer_norm_eps)
      .def_readwrite("activation", &VisionConfig::activation)
      .def_readwrite("mm_tokens_per_image", &VisionConfig::mm_tokens_per_image)
      .def_readwrite("text_hidden_size", &VisionConfig::text_hidden_size)
      .def_readwrite("boi_token_id", &VisionConfig::boi_token_id)
      .def_readwrite("eoi_token_id", &VisionConfig::eoi_token_id)
      .def_readwrite("image_token_id", &VisionConfig::image_token_id)
      .def_property_readonly("head_dim", &VisionConfig::head_dim)
      .def_property_readonly("num_patches", &VisionConfig::num_patches)
      .def_property_readonly("patches_per_side", &VisionConfig::patches_per_side)
      .def_property_readonly("tokens_per_side", &VisionConfig::tokens_per_side)
      .def_property_readonly("pool_kernel", &VisionConfig::pool_kernel)
      .def("validate", &VisionConfig::validate);

  py::class_<VisionEncoderCpu>(m, "VisionEncoderCpu")
      .def(py::init([](const VisionConfig& cfg, const std::string& dtype) { return new VisionEncoderCpu(cfg, parse_dtype(dtype)); }),
           py::arg("config"), py::arg("dtype"))
      .def_property_readonly("config", &VisionEncoderCpu::config)
      .def_property_readonly("weight_bytes", &VisionEncoderCpu::bytes)
      .def_property_readonly("weight_dtype", [](VisionEncoderCpu& e) { return std::string(dtype_name(e.dtype())); })
      .def("expected_weights", &VisionEncoderCpu::expected)
      .def("missing_weights", &VisionEncoderCpu::missing)
      .def("set_weight",
           [](VisionEncoderCpu& e, const std::string& name, py::array a) {
             a = py::array::ensure(a, py::array::c_style);
             const DType dt = dtype_of(a, name);
             std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
             e.set(name, a.data(), dt, shape);
           })
      .def("encode",
           [](VisionEncoderCpu& e, f32arr px) {
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
           [](VisionEncoderCpu& e, f32arr px) {
             const VisionConfig& c = e.config();
             check_pixels(c, px);
             py::array_t<float> out({(py::ssize_t)px.shape(0), (py::ssize_t)c.mm_tokens_per_image, (py::ssize_t)c.text_hidden_size});
             {
               py::gil_scoped_release nogil;
               e.forward(px.data(), (int)px.shape(0), out.mutable_data());
             }
             return out;
           },
           py::arg("pixel_values"), "tower + projector: [n, C, S, S] -> image embeddings [n, mm_tokens, text_hidden]");

  // ---- vision kernels on numpy arrays (tests, microbenchmarks) ----
  m.def("layernorm", [](f32arr x, f32arr w, f32arr b, float eps) {
    need(x.ndim() == 2 && w.ndim() == 1 && b.ndim() == 1 && w.shape(0) == x.shape(1) && b.shape(0) == x.shape(1),
         "layernorm: x [rows, dim], w [dim], b [dim]");
    py::array_t<float> out({x.shape(0), x.shape(1)});
    layernorm_cpu(out.mutable_data(), x.data(), w.data(), b.data(), (int)x.shape(0), (int)x.shape(1), eps);
    return out;
  });
  m.def("bias_add", [](f32arr x, f32arr b) {
    need(x.ndim() == 2 && b.ndim() == 1 && b.shape(0) == x.shape(1), "bias_add: x [rows, cols], b [cols]");
    py::array_t<float> out({x.shape(0), x.shape(1)});
    std::copy_n(x.data(), x.size(), out.mutable_data());
    bias_add_cpu(out.mutable_data(), b.data(), (int)x.shape(0), (int)x.shape(1));
    return out;
  });
  m.def("bias_gelu_tanh", [](f32arr x, f32arr b) {
    need(x.ndim() == 2 && b.ndim() == 1 && b.shape(0) == x.shape(1), "bias_gelu_tanh: x [rows, cols], b [cols]");
    py::array_t<float> out({x.shape(0), x.shape(1)});
    std::copy_n(x.data(), x.size(), out.mutable_data());
    bias_gelu_tanh_cpu(out.mutable_data(), b.data(), (int)x.shape(0), (int)x.shape(1));
    return out;
  });
  m.def("bias_residual_add", [](f32arr resid, f32arr delta, f32arr b) {
    need(resid.ndim() == 2 && delta.ndim() == 2 && resid.shape(0) == delta.shape(0) && resid.shape(1) == delta.shape(1) &&
             b.ndim() == 1 && b.shape(0) == resid.shape(1),
         "bias_residual_add: resid, delta [rows, cols], b [cols]");
    py::array_t<float> out({resid.shape(0), resid.shape(1)});
    std::copy_n(resid.data(), resid.size(), out.mutable_data());
    bias_residual_add_cpu(out.mutable_data(), delta.data(), b.data(), (int)resid.shape(0), (int)resid.shape(1));
    return out;
  });
  m.def("unfold_patches", [](f32arr img, int patch) {
    need(img.ndim() == 3 && patch > 0 && img.shape(1) % patch == 0 && img.shape(2) % patch == 0,
         "unfold_patches: image [C, H, W] with H, W multiples of patch");
    const int C = (int)img.shape(0), H = (int)img.shape(1), W = (int)img.shape(2);
    py::array_t<float> out({(py::ssize_t)(H / patch) * (W / patch), (py::ssize_t)C * patch * patch});
    unfold_patches_cpu(out.mutable_data(), img.data(), C, H, W, patch);
    return out;
  });
  m.def("patch_embed", [](f32arr img, py::array w, f32arr bias, f32arr pos, int patch) {
    need(img.ndim() == 3 && img.shape(1) == img.shape(2) && patch > 0 && img.shape(1) % patch == 0,
         "patch_embed: square image [C, S, S], S a multiple of patch");
    const int C = (int)img.shape(0), S = (int)img.shape(1), g = S / patch;
    WeightView wv = matrix_view(w, "w");
    need(wv.cols == (int64_t)C * patch * patch && bias.size() == wv.rows && pos.ndim() == 2 &&
             pos.shape(0) == (py::ssize_t)g * g && pos.shape(1) == wv.rows,
         "patch_embed: w [hidden, C*p*p], bias [hidden], pos [patches, hidden]");
    py::array_t<float> out({(py::ssize_t)g * g, (py::ssize_t)wv.rows});
    std::vector<float> scratch((size_t)g * g * C * patch * patch);
    {
      py::gil_scoped_release nogil;
      patch_embed_cpu(out.mutable_data(), img.data(), C, S, patch, wv, bias.data(), pos.data(), scratch.data());
    }
    return out;
  });
  // q, k, v [n, heads, head_dim] -> [n, heads, head_dim]
  m.def("attention_full", [](f32arr q, f32arr k, f32arr v, float scale) {
    need(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3, "attention_full: q, k, v [n, heads, head_dim]");
    const int n = (int)q.shape(0), H = (int)q.shape(1), D = (int)q.shape(2);
    need(k.shape(0) == n && k.shape(1) == H && k.shape(2) == D && v.shape(0) == n && v.shape(1) == H && v.shape(2) == D,
         "attention_full: q, k, v must have the same shape");
    py::array_t<float> out({n, H, D});
    std::vector<float> scratch(attention_full_scratch(n, H, D));
    {
      py::gil_scoped_release nogil;
      attention_full_cpu(out.mutable_data(), q.data(), k.data(), v.data(), (int64_t)H * D, n, H, D, scale, scratch.data());
    }
    return out;
  });
  m.def("avg_pool", [](f32arr x, int grid, int k) {
    need(x.ndim() == 2 && x.shape(0) == (py::ssize_t)grid * grid && k > 0 && grid % k == 0,
         "avg_pool: x [grid*grid, dim], grid a multiple of k");
    const int t = grid / k;
    py::array_t<float> out({(py::ssize_t)t * t, x.shape(1)});
    avg_pool_cpu(out.mutable_data(), x.data(), grid, (int)x.shape(1), k);
    return out;
  });
  m.def("mm_projector", [](f32arr x, int grid, int k, f32arr norm_w, float eps, py::array w) {
    need(x.ndim() == 2 && x.shape(0) == (py::ssize_t)grid * grid && k > 0 && grid % k == 0,
         "mm_projector: x [grid*grid, Hv], grid a multiple of k");
    const int Hv = (int)x.shape(1), t = grid / k;
    WeightView wv = matrix_view(w, "w");
    need(wv.cols == Hv && norm_w.size() == Hv, "mm_projector: w [Ht, Hv], norm_w [Hv]");
    py::array_t<float> out({(py::ssize_t)t * t, (py::ssize_t)wv.rows});
    std::vector<float> scratch(2 * (size_t)t * t * Hv);
    {
      py::gil_scoped_release nogil;
      mm_projector_cpu(out.mutable_data(), x.data(), grid, Hv, k, norm_w.data(), eps, wv, scratch.data());
    }
    return out;
  });
}
