"""The persistent decode kernel (decode_persistent.cu: every layer of a batch-1/2 bf16 decode step in
one launch, phases separated by grid-wide barriers) on the three families at the head dims where it
applies (128 and 256), with windows that wrap and global layers that need several 64-key splits:
- teacher-forced decode logits from position 100 to 299 against transformers float32 on the same
  bf16-rounded weights: ||diff|| / ||ref|| <= 3e-2 (the bound of every bf16 engine test);
- against the engine's one-launch-per-operation path on the same steps: ||diff|| / ||ref|| <= 4e-3.
  The two differ only in the order of float32 sums inside the products (segments vs warps per row),
  which can move a bf16 rounding of an activation by one unit (2^-8 relative) now and then;
- bit-identical on a second run, and a batch of two gives each sequence's batch-1 bits;
- greedy generation through the CUDA graph (many replays: the barrier counters must come back to 0)
  equals the ungraphed path, and the kernel really ran (persistent_launches).
The kernel is off by default (engine.persistent_decode; measured slower than the per-operation path so
far): these tests turn it on."""
from __future__ import annotations

import numpy as np
import pytest

import gemma3_native as g3

from conftest import make_hf_model, save_checkpoint
from test_cuda_decode import N0, check_deterministic_and_batch_invariant, decode_logits
from test_cuda_model import HAVE_GPU, bf16_copy, hf_logits, prompt_ids

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a GPU")]

N = 300
CASES = {
    # Gemma 3: local window 8 (rings wrap), a global layer, QK-norm, GQA 4:1 at head_dim 256
    "gemma3-D256": ("gemma3", dict(head_dim=256, num_attention_heads=4, num_key_value_heads=1,
                                   query_pre_attn_scalar=256)),
    # Gemma 3 at head_dim 128 with 2 kv heads and 8 query heads (several attention items per split)
    "gemma3-D128": ("gemma3", dict(head_dim=128, num_attention_heads=8, num_key_value_heads=4,
                                   query_pre_attn_scalar=128)),
    # Gemma 2: attention logit soft-cap, no QK-norm
    "gemma2-D128": ("gemma2", dict(head_dim=128, query_pre_attn_scalar=128)),
    # Gemma 1: no post norms, multi-query, 1/sqrt(head_dim)
    "gemma-D256": ("gemma", dict(head_dim=256)),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def setup(request, tmp_path_factory, tokenizer_model):
    kind, over = CASES[request.param]
    hf = make_hf_model(kind, seed=8, **over)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("ck") / "ck", tokenizer_model)
    m = g3.load(d, device="cuda", dtype="bfloat16", max_batch=4, max_context=512)
    assert not m.engine.persistent_decode_ok(1)  # off by default
    m.engine.persistent_decode = True
    assert m.engine.persistent_decode_ok(1) and m.engine.persistent_decode_ok(2)
    assert not m.engine.persistent_decode_ok(3)
    return hf, m, prompt_ids(N, seed=9)


def per_operation(eng, fn):
    """fn() on the per-operation path with its decode attention on the split grid and its qkv product and
    QK-norm + RoPE as two launches, as the persistent kernel's
    (not in a thread-block cluster, whose combine order differs)."""
    eng.persistent_decode, cl = False, eng.decode_cluster
    eng.decode_cluster, eng.fuse_qkv_rope = 0, 0
    try:
        return fn()
    finally:
        eng.persistent_decode, eng.decode_cluster, eng.fuse_qkv_rope = True, cl, 0


def test_logits_vs_transformers_and_per_operation_path(setup):
    hf, m, ids = setup
    eng = m.engine
    before = eng.persistent_launches
    got = decode_logits(eng, ids)[0]
    assert eng.persistent_launches - before == N - N0
    ref = hf_logits(bf16_copy(hf), ids)[N0 - 1:]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    plain = per_operation(eng, lambda: decode_logits(eng, ids)[0])
    rel_plain = np.linalg.norm(got - plain) / np.linalg.norm(plain)
    print(f"persistent decode: vs transformers {rel:.3g}, vs per-operation path {rel_plain:.3g}")
    assert np.isfinite(got).all()
    assert rel <= 3e-2
    assert rel_plain <= 4e-3


def test_deterministic_and_batch_invariant(setup):
    _, m, ids = setup
    check_deterministic_and_batch_invariant(m.engine, ids, slots=(2, 0))


def test_graph_replays_equal_ungraphed(setup):
    _, m, _ = setup
    eng = m.engine
    prompts = [prompt_ids(150, seed=41), prompt_ids(9, seed=42)]
    eng.use_graphs = False
    try:
        plain = m.generate_ids(prompts, max_new_tokens=64, ignore_eos=True)
    finally:
        eng.use_graphs = True
    before = eng.persistent_launches
    eng.clear_graphs()
    graphed = m.generate_ids(prompts, max_new_tokens=64, ignore_eos=True)
    assert graphed == plain
    assert eng.persistent_launches - before == 1  # captured once, replayed for every step
    single = m.generate_ids(prompts[:1], max_new_tokens=64, ignore_eos=True)
    assert single[0] == graphed[0]


def test_short_decode_matches_per_operation_path(setup):
    """A few steps at batch 1 and 2 (small enough for compute-sanitizer, which bench/run_gpu.sh runs on it)."""
    _, m, ids = setup
    eng = m.engine

    def run(B):
        return decode_logits(eng, ids[:74], slots=tuple(range(B)), n0=70)

    for B in (1, 2):
        got = run(B)
        plain = per_operation(eng, lambda: run(B))
        rel = np.linalg.norm(got - plain) / np.linalg.norm(plain)
        assert rel <= 4e-3, (B, rel)
