"""Bad input gets a clear Python exception naming what is wrong, never a crash."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import gemma3_native as g3
from gemma3_native.safetensors_io import load_file, save_file


def copy_ck(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def ck(tiny_checkpoints, tmp_path):
    return copy_ck(tiny_checkpoints["gemma3"][1], tmp_path / "ck")


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return g3.load(tiny_checkpoints["gemma3"][1], dtype="float32", max_context=32)


def rewrite(ck, fn):
    t = {k: (v.dtype, np.array(v.data)) for k, v in load_file(ck / "model.safetensors").items()}
    fn(t)
    (ck / "model.safetensors").unlink()
    save_file(ck / "model.safetensors", t)


def test_missing_safetensors(ck):
    (ck / "model.safetensors").unlink()
    with pytest.raises(g3.CheckpointError, match="no model.safetensors"):
        g3.load(ck)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_safetensors(ck, how):
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x07" * 64)
    with pytest.raises(g3.CheckpointError, match="model.safetensors"):
        g3.load(ck)


def test_missing_tensor(ck):
    rewrite(ck, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(g3.CheckpointError, match=r"layers\.3\.up_proj"):
        g3.load(ck)


def test_wrong_shape(ck):
    def shrink(t):
        dt, a = t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.1.self_attn.k_proj.weight"] = (dt, a[:-1])
    rewrite(ck, shrink)
    with pytest.raises(g3.CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        g3.load(ck)


def test_unexpected_tensor(ck):
    rewrite(ck, lambda t: t.__setitem__("model.layers.0.mlp.bogus.weight", ("F32", np.zeros((2, 2), np.float32))))
    with pytest.raises(g3.CheckpointError, match="bogus"):
        g3.load(ck)


def test_unknown_model_type(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(g3.ConfigError, match="unsupported model_type 'llama'"):
        g3.load(ck)


def test_malformed_and_missing_config(ck):
    (ck / "config.json").write_text("{not json")
    with pytest.raises(g3.ConfigError, match="not valid JSON"):
        g3.load(ck)
    (ck / "config.json").unlink()
    with pytest.raises(g3.ConfigError, match="config.json not found"):
        g3.load(ck)


def test_inconsistent_config(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # 6 heads are not a multiple of 4
    cfg["layer_types"] = cfg["layer_types"][:3]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(g3.ConfigError):
        g3.load(ck)


def test_missing_or_bad_tokenizer(ck):
    (ck / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(g3.TokenizerError):
        g3.load(ck)
    (ck / "tokenizer.model").unlink()
    with pytest.raises(g3.TokenizerError, match="not found"):
        g3.load(ck)


def test_missing_path_and_bad_arguments(tmp_path, tiny_checkpoints):
    with pytest.raises(FileNotFoundError):
        g3.load(tmp_path / "nothing")
    d = tiny_checkpoints["gemma3"][1]
    with pytest.raises(ValueError, match="device"):
        g3.load(d, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        g3.load(d, dtype="float16")
    with pytest.raises(ValueError, match="max_context"):
        g3.load(d, max_context=10**9)
    with pytest.raises(ValueError, match="max_batch"):
        g3.load(d, max_batch=0)


def test_ids_out_of_range(model):
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} out of range"):
        model.forward([2, V])
    with pytest.raises(ValueError, match="out of range"):
        model.forward([-1])
    # the engine checks too, for callers that bypass the Python layer
    with pytest.raises(IndexError):
        model.engine.forward(np.array([0], np.int32), np.array([1], np.int32), np.array([V], np.int32))


def test_prompt_beyond_context(model):
    with pytest.raises(g3.ContextLengthError, match="max_context 32"):
        model.generate("x " * 100)
    with pytest.raises(g3.ContextLengthError):
        model.forward(list(range(4, 40)))
    with pytest.raises(ValueError, match="max_context"):  # the engine refuses to overflow a slot
        model.engine.forward(np.array([0], np.int32), np.array([33], np.int32), np.full(33, 5, np.int32))


def test_empty_prompt_and_bad_generate_args(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="non-empty"):
        model.forward([])
    with pytest.raises(TypeError):
        model.generate(42)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", top_p=0)
    with pytest.raises(ValueError, match="stream"):
        model.generate(["a", "b"], stream=True)
    with pytest.raises(ValueError, match="role"):
        model.chat([{"role": "robot", "content": "x"}])
