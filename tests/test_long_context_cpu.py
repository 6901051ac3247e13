"""Long prompts on the CPU: a tiny Gemma 3 with a window of 8 on a 600-token prompt, fed in chunks,
against transformers (float32). The ring buffer of each local layer wraps 75 times."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gemma3_native as g3
from gemma3_native import model as model_mod

from conftest import VOCAB, make_hf_model, save_checkpoint

N = 600


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_model):
    hf = make_hf_model("gemma3", seed=3, max_position_embeddings=2048)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("long"), tokenizer_model)
    return hf, g3.load(d, dtype="float32", max_context=N + 40)


def test_600_token_prompt_logits_and_greedy(pair, monkeypatch):
    hf, ours = pair
    ids = [2] + np.random.default_rng(7).integers(4, VOCAB, N - 1).tolist()
    monkeypatch.setattr(model_mod, "PREFILL_CHUNK", 128)  # chunked prefill, bounded activations
    with torch.no_grad():
        out = hf(torch.tensor([ids]))
    ref = out.logits[0].double().numpy()
    got = ours.forward(ids)
    err = np.abs(got - ref).max()
    print(f"600 tokens, window 8: max |logit err| {err:.3g}")
    assert err <= 1e-4
    # greedy continuation from the cached 600 positions: the oracle recomputes everything each step
    seq, want = list(ids), []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(hf(torch.tensor([seq])).logits[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
    assert ours.generate_ids([ids], max_new_tokens=8, ignore_eos=True)[0] == want


def test_kv_cache_bytes_ring_vs_global(pair):
    """Local layers hold `window` positions, global ones max_context: the reported size says so."""
    _, ours = pair
    c = ours.config
    n_local = sum(1 for t in c.layer_types if t.name == "Local")
    n_global = c.num_layers - n_local
    per_pos = 2 * c.num_kv_heads * c.head_dim * 4  # k and v, float32
    want = per_pos * (n_local * min(c.sliding_window, ours.max_context) + n_global * ours.max_context)
    assert ours.kv_cache_bytes == want * ours.max_batch
    assert [ours.engine.cache_capacity(l) for l in range(c.num_layers)] == [
        8 if t.name == "Local" else ours.max_context for t in c.layer_types]
