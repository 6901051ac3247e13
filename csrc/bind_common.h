// bind_common.h: what the Python modules (_core and _cuda) share: numpy argument helpers, and the
// engine interface both CpuEngine and CudaEngine present to the Python layer, bound once so that
// the two backends take the same arguments and refuse the same bad input.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "config.h"
#include "cpu/common.h"
#include "batch.h"       // kMaxDecodeSteps
#include "engine_cpu.h"  // ForwardExtras

namespace g3 {
namespace py = pybind11;

using f32arr = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i32arr = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using u64arr = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

inline void need(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

inline DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "bfloat16") return DType::BF16;
  throw py::value_error("dtype must be 'float32' or 'bfloat16', got '" + s + "'");
}

// float32, or bfloat16 carried as uint16 bits.
inline DType dtype_of(const py::array& a, const std::string& what) {
  if (py::isinstance<py::array_t<float>>(a)) return DType::F32;
  if (py::isinstance<py::array_t<uint16_t>>(a)) return DType::BF16;
  throw py::type_error(what + ": expected float32 or bfloat16 bits (uint16), got " + py::str(a.dtype()).cast<std::string>());
}

// A contiguous matrix view of a numpy weight array (kept alive by the caller for the call's duration).
inline WeightView matrix_view(const py::array& a, const std::string& what) {
  need(a.ndim() == 2, what + ": expected a 2-D array");
  need((a.flags() & py::array::c_style) != 0, what + ": array must be C-contiguous");
  return WeightView{a.data(), dtype_of(a, what), (int64_t)a.shape(0), (int64_t)a.shape(1)};
}

// Shapes of a ragged batch: 1-D slots/lengths/tokens, and as many tokens as the lengths add up to.
inline int64_t batch_tokens(const i32arr& slots, const i32arr& lengths, const i32arr& tokens) {
  need(slots.ndim() == 1 && lengths.ndim() == 1 && tokens.ndim() == 1, "slots, lengths and tokens must be 1-D");
  need(slots.size() == lengths.size(), "slots and lengths differ in length");
  int64_t T = 0;
  for (py::ssize_t i = 0; i < lengths.size(); ++i) T += std::max(0, lengths.data()[i]);
  need(T == tokens.size(),
       "lengths add up to " + std::to_string(T) + " but " + std::to_string(tokens.size()) + " tokens were given");
  return T;
}

// The interface both engines share, forward with its multimodal extras included.
template <class Engine>
void bind_engine_common(py::class_<Engine>& c) {
  c.def(py::init([](const ModelConfig& cfg, const std::string& dtype, int max_batch, int max_context) {
         cfg.validate();
         return new Engine(cfg, parse_dtype(dtype), max_batch, max_context);
       }),
       py::arg("config"), py::arg("dtype"), py::arg("max_batch"), py::arg("max_context"))
      .def_property_readonly("config", &Engine::config)
      .def_property_readonly("max_batch", &Engine::max_batch)
      .def_property_readonly("max_context", &Engine::max_context)
      .def_property_readonly("kv_cache_bytes", &Engine::kv_cache_bytes)
      .def_property_readonly("weight_bytes", [](Engine& e) { return e.weights().bytes(); })
      .def_property_readonly("weight_dtype", [](Engine& e) { return std::string(dtype_name(e.weights().dtype())); })
      .def("cache_capacity", &Engine::cache_capacity)
      .def("expected_weights", [](Engine& e) { return e.weights().expected(); })
      .def("missing_weights", [](Engine& e) { return e.weights().missing(); })
      .def("set_weight",
           [](Engine& e, const std::string& name, py::array a) {
             if (!(a.flags() & py::array::c_style)) a = py::array::ensure(a, py::array::c_style);
             const DType dt = dtype_of(a, name);
             std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
             e.set_weight(name, a.data(), dt, shape);
           })
      .def("slot_length", &Engine::slot_length)
      .def("reset_slot", &Engine::reset_slot)
      .def("reset_all", &Engine::reset_all)
      .def(
          "forward_sample",
          [](Engine& e, i32arr slots, i32arr lengths, i32arr tokens, f32arr temperature, i32arr top_k, f32arr top_p,
             u64arr seed, u64arr counter) {
            batch_tokens(slots, lengths, tokens);
            const py::ssize_t B = slots.size();
            need(temperature.size() == B && top_k.size() == B && top_p.size() == B && seed.size() == B &&
                     counter.size() == B,
                 "forward_sample: one temperature/top_k/top_p/seed/counter per slot");
            py::array_t<int32_t> ids(B);
            {
              py::gil_scoped_release nogil;
              e.forward_sample(slots.data(), lengths.data(), (int)B, tokens.data(), temperature.data(), top_k.data(),
                               top_p.data(), seed.data(), counter.data(), ids.mutable_data());
            }
            return ids;
          },
          py::arg("slots"), py::arg("lengths"), py::arg("tokens"), py::arg("temperature"), py::arg("top_k"),
          py::arg("top_p"), py::arg("seed"), py::arg("counter"))
      .def(
          "decode_steps",
          [](Engine& e, i32arr slots, i32arr tokens, f32arr temperature, i32arr top_k, f32arr top_p, u64arr seed,
             u64arr counter, int nsteps) {
            const py::ssize_t B = slots.size();
            need(slots.ndim() == 1 && tokens.size() == B && temperature.size() == B && top_k.size() == B &&
                     top_p.size() == B && seed.size() == B && counter.size() == B,
                 "decode_steps: one token/temperature/top_k/top_p/seed/counter per slot");
            need(nsteps >= 1 && nsteps <= kMaxDecodeSteps,
                 "decode_steps: nsteps must be 1.." + std::to_string(kMaxDecodeSteps) + ", got " + std::to_string(nsteps));
            std::vector<int32_t> buf((size_t)nsteps * B);
            int n = 0;
            {
              py::gil_scoped_release nogil;
              n = e.decode_steps(slots.data(), (int)B, tokens.data(), temperature.data(), top_k.data(), top_p.data(),
                                 seed.data(), counter.data(), nsteps, buf.data());
            }
            py::array_t<int32_t> ids({(py::ssize_t)n, B});
            std::memcpy(ids.mutable_data(), buf.data(), (size_t)n * B * 4);
            return ids;
          },
          py::arg("slots"), py::arg("tokens"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
          py::arg("seed"), py::arg("counter"), py::arg("nsteps"))
      .def(
          "forward",
          [](Engine& e, i32arr slots, i32arr lengths, i32arr tokens, bool all_logits, py::object embeds,
             py::object embed_rows, py::object extent) {
            const int64_t T = batch_tokens(slots, lengths, tokens);
            // multimodal extras: image embeddings for some rows, per-token attention extents
            ForwardExtras ex;
            f32arr emb;
            i32arr rows, ext;
            need(embeds.is_none() == embed_rows.is_none(), "embeds and embed_rows go together");
            if (!embeds.is_none()) {
              emb = embeds.cast<f32arr>();
              rows = embed_rows.cast<i32arr>();
              need(emb.ndim() == 2 && emb.shape(1) == e.config().hidden_size && rows.ndim() == 1 && rows.size() == emb.shape(0),
                   "embeds must be [n, hidden] with one row index each in embed_rows");
              ex.embeds = emb.data(); ex.embed_rows = rows.data(); ex.n_embeds = (int)rows.size();
            }
            if (!extent.is_none()) {
              ext = extent.cast<i32arr>();
              need(ext.ndim() == 1 && ext.size() == T, "extent must have one entry per token");
              ex.extent = ext.data();
            }
            const int B = (int)slots.size();
            const int V = e.config().vocab_size;
            py::array_t<float> out({all_logits ? (py::ssize_t)T : (py::ssize_t)B, (py::ssize_t)V});
            {
              py::gil_scoped_release nogil;
              e.forward(slots.data(), lengths.data(), B, tokens.data(), all_logits, out.mutable_data(), &ex);
            }
            return out;
          },
          py::arg("slots"), py::arg("lengths"), py::arg("tokens"), py::arg("all_logits") = false,
          py::arg("embeds") = py::none(), py::arg("embed_rows") = py::none(), py::arg("extent") = py::none());
}

}  // namespace g3
