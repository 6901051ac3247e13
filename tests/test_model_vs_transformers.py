"""The whole model against transformers (float32, CPU, eager attention) on random tiny configs:
Gemma 3 (5 local + 1 global + 1 local, window 8, GQA 3:1, QK-norm, two RoPE bases, linear scaling),
Gemma 2 (alternating layers, both soft-caps), Gemma 1 (all global, MQA, no post-norms).

Tolerance: max |logit difference| <= 1e-4 (float32 against float32, logits of order 1-10)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import gemma3_native as g3
from gemma3_native import model as model_mod
from gemma3_native.config import spec_from_dict
from gemma3_native.safetensors_io import load_file, save_file

from conftest import VOCAB

LOGIT_ATOL = 1e-4
KINDS = ["gemma3", "gemma2", "gemma"]


def prompt_ids(n: int, seed: int) -> list[int]:
    ids = np.random.default_rng(seed).integers(4, VOCAB, n).tolist()
    return [2] + ids[1:]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step: no cache on the oracle's side."""
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    return {k: (m, g3.load(d, dtype="float32", max_batch=3)) for k, (m, d) in tiny_checkpoints.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logits(loaded, kind):
    hf, ours = loaded[kind]
    ids = prompt_ids(41, seed=1)  # > 2 x window 8
    ref = hf_logits(hf, ids)
    got = ours.forward(ids)
    err = np.abs(got - ref).max()
    print(f"{kind}: max |logit err| = {err:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert err <= LOGIT_ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_64_tokens_past_twice_the_window(loaded, kind):
    hf, ours = loaded[kind]
    ids = prompt_ids(12, seed=2)
    want = hf_greedy(hf, ids, 64)  # 76 positions: the window-8 ring buffer wraps many times
    got = ours.generate_ids([ids], max_new_tokens=64, ignore_eos=True)[0]
    assert got == want


def test_chunked_prefill_matches_whole(loaded, monkeypatch):
    hf, ours = loaded["gemma3"]
    ids = prompt_ids(37, seed=3)
    whole = ours.forward(ids)
    monkeypatch.setattr(model_mod, "PREFILL_CHUNK", 5)  # chunks shorter than the window, and across it
    chunked = ours.forward(ids)
    assert np.abs(whole - chunked).max() <= 1e-5
    assert np.abs(chunked - hf_logits(hf, ids)).max() <= LOGIT_ATOL


def test_batch_of_ragged_prompts_equals_each_alone(loaded):
    hf, ours = loaded["gemma3"]
    prompts = [prompt_ids(n, seed=10 + n) for n in (5, 19, 11)]
    batched = ours.forward(prompts)
    for p, b in zip(prompts, batched):
        assert np.array_equal(ours.forward(p), b)  # bitwise: nothing in a row depends on its batch-mates
    gen_b = ours.generate_ids(prompts, max_new_tokens=20, ignore_eos=True)
    gen_1 = [ours.generate_ids([p], max_new_tokens=20, ignore_eos=True)[0] for p in prompts]
    assert gen_b == gen_1


def test_text_batch_equals_unbatched_with_sampling(loaded):
    _, ours = loaded["gemma3"]
    prompts = ["The quick brown fox", "def add(a, b):", "Gemma"]
    batched = ours.generate(prompts, max_new_tokens=12, temperature=0.9, top_k=40, seed=7)
    alone = [ours.generate(p, max_new_tokens=12, temperature=0.9, top_k=40, seed=7 + i) for i, p in enumerate(prompts)]
    assert batched == alone


def test_more_prompts_than_max_batch(loaded):
    _, ours = loaded["gemma2"]
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    assert ours.generate(prompts, max_new_tokens=6) == [ours.generate(p, max_new_tokens=6) for p in prompts]


def _relayout(src, dst, tokenizer_model, prefix: str, shards: bool = False):
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    renamed = {prefix + k[len("model."):] if k.startswith("model.") else k: (t.dtype, np.array(t.data))
               for k, t in tensors.items()}
    if shards:
        names = sorted(renamed)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for fname, ns in parts.items():
            save_file(dst / fname, {n: renamed[n] for n in ns})
        wm = {n: f for f, ns in parts.items() for n in ns}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        save_file(dst / "model.safetensors", renamed)
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(tokenizer_model, dst / "tokenizer.model")


@pytest.mark.parametrize("prefix,shards", [("model.language_model.", False), ("language_model.model.", True),
                                           ("model.", True)])
def test_tensor_name_layouts_and_shards(loaded, tiny_checkpoints, tokenizer_model, tmp_path, prefix, shards):
    _, src = tiny_checkpoints["gemma3"]
    _relayout(src, tmp_path / "ck", tokenizer_model, prefix, shards)
    ids = prompt_ids(17, seed=4)
    alt = g3.load(tmp_path / "ck", dtype="float32")
    assert np.array_equal(alt.forward(ids), loaded["gemma3"][1].forward(ids))


def test_old_and_new_rope_config_keys_agree(tiny_checkpoints):
    _, d = tiny_checkpoints["gemma3"]
    new = json.loads((d / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    a, b = spec_from_dict(new).config, spec_from_dict(old).config
    for r in ("rope_local", "rope_global"):
        ra, rb = getattr(a, r), getattr(b, r)
        assert (ra.theta, ra.scaling, ra.factor) == (rb.theta, rb.scaling, rb.factor)
    assert b.rope_global.factor == 8.0 and b.rope_local.theta == 10000.0 and b.rope_global.theta == 1e6
    # multimodal wrapper: the text part of a gemma3 config
    mm = spec_from_dict({"model_type": "gemma3", "text_config": dict(new)})
    assert mm.multimodal and mm.config.num_layers == a.num_layers


def test_bf16_checkpoint_loads_in_bf16(tiny_checkpoints, tokenizer_model, tmp_path):
    """A bf16 checkpoint stays bf16 in memory; its logits match our float32 engine on the same rounded
    weights up to the bf16 embedding scale (sqrt(H) rounded, as transformers does in bf16)."""
    hf, _ = tiny_checkpoints["gemma"]
    import copy
    m16 = copy.deepcopy(hf).to(torch.bfloat16)
    d = tmp_path / "bf16"
    m16.save_pretrained(d, safe_serialization=True)
    shutil.copy(tokenizer_model, d / "tokenizer.model")
    ours = g3.load(d)
    assert ours.engine.weight_dtype == "bfloat16"
    ids = prompt_ids(9, seed=5)
    ref = hf_logits(m16.float(), ids)
    got = ours.forward(ids)
    # only the embedding scale differs (bf16(sqrt(48)) = 6.9375 vs 6.9282): a ~1e-3 relative change
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-2
    assert ours.kv_cache_bytes > 0
