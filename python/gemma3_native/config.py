"""Hugging Face config.json -> the engine's ModelConfig (csrc/config.h, the single source of truth).

Handles model_type gemma, gemma2, gemma3_text and gemma3 (its text_config), with both the
transformers-5 `rope_parameters` and the older `rope_theta` / `rope_local_base_freq` / `rope_scaling`
keys. Missing keys take transformers' defaults for that model type, because released multimodal
configs rely on them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _native


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model this engine does not run."""


# transformers' defaults per text model type (configuration_gemma*.py), used for keys a config omits.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None, sliding_window_pattern=6),
}
_FAMILY = {"gemma": _native.Family.Gemma1, "gemma2": _native.Family.Gemma2, "gemma3_text": _native.Family.Gemma3}
_ACTIVATIONS = {"gelu_pytorch_tanh", "gelu_tanh", "gelu_new"}


@dataclass
class ModelSpec:
    """What the Python layer needs beside the engine config: token ids and where the config came from."""
    config: Any                      # _core.ModelConfig
    model_type: str                  # text model type: gemma, gemma2, gemma3_text
    source: str
    bos_token_id: int = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0
    multimodal: bool = False
    raw: dict = field(default_factory=dict)
    vision: Any = None               # _core.VisionConfig of a multimodal (gemma3) config, else None


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config.json not found")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return d


def _rope(params: dict | None, where: str):
    """One RoPE parameter dict ({'rope_type', 'rope_theta', 'factor'}) -> native RopeConfig."""
    r = _native.RopeConfig()
    params = params or {}
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if "rope_theta" in params and params["rope_theta"] is not None:
        r.theta = float(params["rope_theta"])
    if rtype == "default":
        r.scaling = _native.RopeScaling.None_
    elif rtype == "linear":
        r.scaling = _native.RopeScaling.Linear
        r.factor = float(params.get("factor", 1.0))
    else:
        raise ConfigError(f"{where}: RoPE type '{rtype}' is not supported (default and linear are)")
    return r


def spec_from_dict(d: dict, source: str = "config.json") -> ModelSpec:
    """Build the engine config from a parsed config.json."""
    top_type = d.get("model_type")
    multimodal = False
    if top_type == "gemma3":
        multimodal = True
        text = dict(d.get("text_config") or {})
        text.setdefault("model_type", "gemma3_text")
        d_text = text
    else:
        d_text = d
    mt = d_text.get("model_type")
    if mt not in _DEFAULTS:
        raise ConfigError(f"{source}: unsupported model_type '{top_type}' (supported: gemma, gemma2, gemma3_text, gemma3)")
    if d_text.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention models (encoders) are not supported")
    if d_text.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported by Gemma checkpoints")
    g = dict(_DEFAULTS[mt])
    g.update({k: v for k, v in d_text.items() if v is not None or k in ("final_logit_softcapping", "attn_logit_softcapping")})

    def need_int(key: str) -> int:
        v = g.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {v!r}")
        return v

    c = _native.ModelConfig()
    c.family = _FAMILY[mt]
    c.vocab_size = need_int("vocab_size")
    c.hidden_size = need_int("hidden_size")
    c.intermediate_size = need_int("intermediate_size")
    c.num_layers = need_int("num_hidden_layers")
    c.num_heads = need_int("num_attention_heads")
    c.num_kv_heads = need_int("num_key_value_heads")
    c.head_dim = need_int("head_dim") if g.get("head_dim") is not None else c.hidden_size // c.num_heads
    c.max_position_embeddings = need_int("max_position_embeddings")
    c.rms_norm_eps = float(g["rms_norm_eps"])
    c.tie_word_embeddings = bool(g.get("tie_word_embeddings", True))

    act = g.get("hidden_activation") or g.get("hidden_act") or "gelu_pytorch_tanh"
    if mt == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # legacy Gemma 1 value meaning the tanh approximation (transformers does the same)
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: activation '{act}' is not supported (Gemma uses gelu_pytorch_tanh)")
    c.activation = _native.Activation.GeluTanh

    if mt == "gemma":
        c.query_scale = _native.QueryScale.InvSqrtHeadDim
        c.post_norm = _native.PostNorm.None_
        c.qk_norm = _native.QKNorm.None_
        c.sliding_window = 0
        types = ["full_attention"] * c.num_layers
    else:
        c.query_scale = _native.QueryScale.InvSqrtQueryPreAttnScalar
        c.query_pre_attn_scalar = float(g["query_pre_attn_scalar"])
        c.post_norm = _native.PostNorm.AttnAndFfw
        c.qk_norm = _native.QKNorm.RMSNorm if mt == "gemma3_text" else _native.QKNorm.None_
        c.sliding_window = need_int("sliding_window")
        types = g.get("layer_types")
        if types is None:
            pattern = 2 if mt == "gemma2" else int(g.get("sliding_window_pattern") or 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c.num_layers)]
    c.attn_logit_softcap = float(g.get("attn_logit_softcapping") or 0.0)
    c.final_logit_softcap = float(g.get("final_logit_softcapping") or 0.0)

    lt = []
    for i, t in enumerate(types):
        if t == "sliding_attention":
            lt.append(_native.AttentionType.Local)
        elif t == "full_attention":
            lt.append(_native.AttentionType.Global)
        else:
            raise ConfigError(f"{source}: layer_types[{i}] = '{t}' is not supported")
    c.layer_types = lt

    # RoPE: per layer type for Gemma 3, one setting for Gemma 1/2.
    rp = g.get("rope_parameters")
    if mt == "gemma3_text":
        if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
            glob = dict(rp.get("full_attention") or {})
            loc = dict(rp.get("sliding_attention") or {})
        else:
            glob = dict(g.get("rope_scaling") or {})
            if isinstance(rp, dict):
                glob.update(rp)
            loc = {"rope_type": "default"}
        glob.setdefault("rope_theta", g.get("rope_theta", 1_000_000.0))
        loc.setdefault("rope_theta", g.get("rope_local_base_freq", 10_000.0))
        c.rope_global = _rope(glob, f"{source}: full_attention rope")
        c.rope_local = _rope(loc, f"{source}: sliding_attention rope")
    else:
        one = dict(rp) if isinstance(rp, dict) else dict(g.get("rope_scaling") or {})
        one.setdefault("rope_theta", g.get("rope_theta", 10_000.0))
        c.rope_global = _rope(one, f"{source}: rope")
        c.rope_local = _rope(one, f"{source}: rope")
    try:
        c.validate()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None

    eos = g.get("eos_token_id", 1)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return ModelSpec(config=c, model_type=mt, source=source, bos_token_id=int(g.get("bos_token_id") or 2),
                     eos_token_ids=eos_ids, pad_token_id=int(g.get("pad_token_id") or 0), multimodal=multimodal, raw=d,
                     vision=(vision_spec_from_dict(d, c.hidden_size, source)
                             if multimodal and d.get("vision_config") is not None else None))


# ---- vision (multimodal gemma3 configs) ----
# Missing keys take transformers' defaults: SiglipVisionConfig for vision_config, Gemma3Config for the rest.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6)
_MM_DEFAULTS = dict(mm_tokens_per_image=256, boi_token_index=255_999, eoi_token_index=256_000,
                    image_token_index=262_144)


def vision_spec_from_dict(d: dict, text_hidden_size: int, source: str = "config.json"):
    """The native VisionConfig of a multimodal gemma3 config.json (vision_config + projector + token ids).
    A gemma3 config without a vision_config gets none (spec.vision is None): only its text model is used."""
    vd = d.get("vision_config") or {}
    if not isinstance(vd, dict):
        raise ConfigError(f"{source}: vision_config must be an object")
    vmt = vd.get("model_type", "siglip_vision_model")
    if vmt != "siglip_vision_model":
        raise ConfigError(f"{source}: vision model_type '{vmt}' is not supported (siglip_vision_model is)")
    g = dict(_VISION_DEFAULTS)
    g.update({k: v for k, v in vd.items() if v is not None})
    top = dict(_MM_DEFAULTS)
    # transformers accepts both the *_index keys and their *_id aliases
    for idx, alias in (("boi_token_index", "boi_token_id"), ("eoi_token_index", "eoi_token_id"),
                       ("image_token_index", "image_token_id")):
        v = d.get(idx, d.get(alias))
        if v is not None:
            top[idx] = v
    if d.get("mm_tokens_per_image") is not None:
        top["mm_tokens_per_image"] = d["mm_tokens_per_image"]

    def need_int(src: dict, key: str, where: str) -> int:
        v = src.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
            v = v[0]  # a square size given as [h, w]
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{source}: '{where}{key}' must be an integer, got {v!r}")
        return v

    act = g.get("hidden_act")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: vision activation '{act}' is not supported (SigLIP uses gelu_pytorch_tanh)")
    v = _native.VisionConfig()
    v.hidden_size = need_int(g, "hidden_size", "vision_config.")
    v.intermediate_size = need_int(g, "intermediate_size", "vision_config.")
    v.num_layers = need_int(g, "num_hidden_layers", "vision_config.")
    v.num_heads = need_int(g, "num_attention_heads", "vision_config.")
    v.num_channels = need_int(g, "num_channels", "vision_config.")
    v.image_size = need_int(g, "image_size", "vision_config.")
    v.patch_size = need_int(g, "patch_size", "vision_config.")
    v.layer_norm_eps = float(g["layer_norm_eps"])
    v.activation = _native.Activation.GeluTanh
    v.mm_tokens_per_image = need_int(top, "mm_tokens_per_image", "")
    v.boi_token_id = need_int(top, "boi_token_index", "")
    v.eoi_token_id = need_int(top, "eoi_token_index", "")
    v.image_token_id = need_int(top, "image_token_index", "")
    v.text_hidden_size = text_hidden_size
    try:
        v.validate()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return v
