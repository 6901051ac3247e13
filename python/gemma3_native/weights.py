"""Checkpoint reading: a Hugging Face directory (config.json, model.safetensors or shards with
model.safetensors.index.json) into the engine, under every Gemma tensor-name layout."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .safetensors_io import SafetensorsError, Tensor, f32_to_bf16_bits, load_file


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or tensors, or a tensor has the wrong shape."""


# Text-decoder prefixes: Gemma*ForCausalLM, older multimodal, newer multimodal.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_COMMON_LEAVES = {
    "input_layernorm": "input_norm",
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "o_proj", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj",
}
# Gemma 1's `post_attention_layernorm` is the norm before the MLP; Gemma 2/3 have a real post-norm.
_LEAVES = {
    "gemma": {**_COMMON_LEAVES, "post_attention_layernorm": "pre_ffw_norm"},
    "gemma2": {**_COMMON_LEAVES, "post_attention_layernorm": "post_attn_norm",
               "pre_feedforward_layernorm": "pre_ffw_norm", "post_feedforward_layernorm": "post_ffw_norm"},
}
_LEAVES["gemma3_text"] = _LEAVES["gemma2"]


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in order."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(wm.values()))
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        files = [directory / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def canonical_name(hf_name: str, model_type: str) -> str | None:
    """HF tensor name -> engine name ('layers.3.q_proj', 'embed', ...); None for tensors that are not
    part of the text decoder (vision tower, projector)."""
    if hf_name in _LM_HEADS:
        return "lm_head"
    if hf_name.startswith(_VISION_PREFIXES):
        return None
    for p in _TEXT_PREFIXES:
        if hf_name.startswith(p):
            rest = hf_name[len(p):]
            break
    else:
        return None
    if rest == "embed_tokens.weight":
        return "embed"
    if rest == "norm.weight":
        return "final_norm"
    m = _LAYER_RE.match(rest)
    if m and m.group(2) in _LEAVES[model_type]:
        return f"layers.{m.group(1)}.{_LEAVES[model_type][m.group(2)]}"
    return "?" + hf_name  # a text tensor we do not know


def storage_dtype(tensor: Tensor, requested: str | None) -> str:
    if requested is not None:
        return requested
    return "bfloat16" if tensor.dtype == "BF16" else "float32"


def as_storage(t: Tensor, dtype: str) -> np.ndarray:
    """A tensor in the engine's storage form: float32, or bfloat16 bits (uint16)."""
    if dtype == "bfloat16":
        if t.dtype == "BF16":
            return np.ascontiguousarray(t.data)
        return f32_to_bf16_bits(t.to_float32())
    return np.ascontiguousarray(t.to_float32())


def _tensors(directory: Path):
    """Every tensor of the checkpoint's files: (file, name, tensor); a bad file is a CheckpointError."""
    for f in checkpoint_files(directory):
        try:
            tensors = load_file(f)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        for hf_name, t in tensors.items():
            yield f, hf_name, t


def scan(directory: Path, model_type: str) -> dict[str, tuple[Path, Tensor]]:
    """Map every text-decoder tensor of the checkpoint: engine name -> (file, tensor)."""
    found: dict[str, tuple[Path, Tensor]] = {}
    for f, hf_name, t in _tensors(directory):
        name = canonical_name(hf_name, model_type)
        if name is None:
            continue
        if name.startswith("?"):
            raise CheckpointError(f"{f}: unexpected tensor '{hf_name}' for model_type {model_type}")
        if name in found:
            raise CheckpointError(f"{f}: tensor '{hf_name}' appears twice in the checkpoint")
        found[name] = (f, t)
    return found


def load_into(engine, directory: Path, found: dict[str, tuple[Path, Tensor]], dtype: str,
              progress: Callable[[int, int], None] | None = None) -> None:
    """Copy the scanned checkpoint tensors into the engine, matrices in `dtype`, vectors in float32."""
    expected: dict[str, list[int]] = engine.expected_weights()
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(_hf_hint(n) for n in missing[:6])}"
                              + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    extra = [n for n in found if n not in expected]
    if extra and not (extra == ["lm_head"]):
        raise CheckpointError(f"{directory}: tensors not used by this config: {', '.join(extra[:6])}")
    for i, (name, shape) in enumerate(expected.items()):
        f, t = found[name]
        if list(t.shape) != list(shape):
            raise CheckpointError(f"{f}: tensor '{t.name}' has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{f}: tensor '{t.name}' has dtype {t.dtype}; float32, bfloat16 or float16 expected")
        engine.set_weight(name, as_storage(t, dtype if len(shape) == 2 else "float32"))
        if progress:
            progress(i + 1, len(expected))


def _hf_hint(name: str) -> str:
    return {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}.get(
        name, f"'{name}'")


# ---- vision tower + multimodal projector (multimodal gemma3 checkpoints) ----
# Every layout seen in the wild: hub checkpoints (`vision_tower.vision_model.*`), transformers 4.5x saves
# (`model.vision_tower.vision_model.*`), transformers 5 saves (`vision_tower.*`, `model.vision_tower.*`).
# The engine's names are the rest: `encoder.layers.3.mlp.fc1.weight`, `mm_input_projection_weight`, ...
_VISION_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                          "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def vision_name(hf_name: str) -> str | None:
    """HF tensor name -> vision engine name; None for tensors outside the vision tower and projector,
    and for the SigLIP pooling head (`head.*`), which Gemma 3 does not use."""
    for p in _VISION_TOWER_PREFIXES:
        if hf_name.startswith(p):
            rest = hf_name[len(p):]
            return None if rest.startswith("head.") else rest
    for p in _PROJECTOR_PREFIXES:
        if hf_name.startswith(p):
            return hf_name[len(p):]
    return None


def scan_vision(directory: Path) -> dict[str, tuple[Path, Tensor]]:
    """Map the vision tower and projector tensors of a checkpoint: engine name -> (file, tensor).
    Empty for a text-only checkpoint."""
    found: dict[str, tuple[Path, Tensor]] = {}
    for f, hf_name, t in _tensors(directory):
        name = vision_name(hf_name)
        if name is None:
            continue
        if name in found:
            raise CheckpointError(f"{f}: vision tensor '{hf_name}' appears twice in the checkpoint")
        found[name] = (f, t)
    return found


def load_vision_into(encoder, directory: Path, found: dict[str, tuple[Path, Tensor]]) -> None:
    """Copy the scanned vision tensors into a VisionEncoderCpu (it converts to its storage dtype)."""
    expected: dict[str, list[int]] = encoder.expected_weights()
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{directory}: missing vision tensor(s) {', '.join(missing[:6])}"
                              + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    extra = [n for n in found if n not in expected]
    if extra:
        raise CheckpointError(f"{directory}: vision tensors not used by this config: {', '.join(extra[:6])}")
    for name, shape in expected.items():
        f, t = found[name]
        if list(t.shape) != list(shape):
            raise CheckpointError(f"{f}: tensor '{t.name}' has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype == "BF16":
            encoder.set_weight(name, np.ascontiguousarray(t.data))
        elif t.dtype in ("F32", "F16"):
            encoder.set_weight(name, np.ascontiguousarray(t.to_float32()))
        else:
            raise CheckpointError(f"{f}: tensor '{t.name}' has dtype {t.dtype}; float32, bfloat16 or float16 expected")
