"""The bf16 CUDA engine's decode step at the real head dims (256 with 4:1 GQA as in 270M/1B, 128 with
2:1 as in 4B/12B/27B-like shapes), where it runs the tensor-core decode attention
(attention_decode_tc.cu):
- teacher-forced decode logits, one token per step from position 100 to 299 (a global layer then
  needs several 64-key splits; local layers wrap their window-8 ring), against transformers float32
  on the same bf16-rounded weights: ||diff|| / ||ref|| <= 3e-2 (the bound of the prefill tests);
- a second run gives the same bits (no order-dependent reduction), a batch of two gives each
  sequence's batch-1 bits (the GEMV computes each row alone), and the CUDA-core decode kernel agrees to 1e-2
  (bf16 probabilities in P.V on tensor cores vs float32 on CUDA cores);
- greedy generation through the CUDA graph equals the ungraphed path;
- the PDL prologues and the early trigger change no bit; QK-norm + RoPE inside the decode attention gives qk_rope_kv's bits, and
  the residual steps inside the GEMVs give residual_rmsnorm's; the qkv product with QK-norm + RoPE in one
  kernel (gemv_qkv_rope) agrees with the two launches to 4e-3; decode attention in one split agrees with
  the default splits, and so does the cluster combine against the split grid, also across its key limit;
- the o product's L2 prefetch of gate_up rows changes no bit."""
from __future__ import annotations

import numpy as np
import pytest

import gemma3_native as g3

from conftest import make_hf_model, save_checkpoint
from test_cuda_model import HAVE_GPU, _cuda, bf16_copy, hf_logits, prompt_ids

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a GPU")]

N, N0 = 300, 100


@pytest.fixture(scope="module", params=[(256, 4, 1), (128, 8, 4)], ids=["D256-gqa4", "D128-gqa2"])
def setup(request, tmp_path_factory, tokenizer_model):
    head_dim, heads, kv = request.param
    hf = make_hf_model("gemma3", seed=4, head_dim=head_dim, num_attention_heads=heads, num_key_value_heads=kv,
                       query_pre_attn_scalar=head_dim)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("ck") / "ck", tokenizer_model)
    m = g3.load(d, device="cuda", dtype="bfloat16", max_batch=2, max_context=512)
    assert m.engine.config.head_dim == head_dim
    ids = prompt_ids(N, seed=6)
    return hf, m, ids


def decode_logits(eng, ids, slots=(0,), n0: int = N0) -> np.ndarray:
    """Prefill ids[:n0] then one token per step; the logits of positions n0-1 .. len(ids)-1 (per slot,
    the same sequence in each)."""
    eng.reset_all()
    B = len(slots)
    sl = np.array(slots, np.int32)
    tok = np.array(ids, np.int32)
    rows = [eng.forward(sl, np.full(B, n0, np.int32), np.tile(tok[:n0], B), False)]
    for i in range(n0, len(tok)):
        rows.append(eng.forward(sl, np.ones(B, np.int32), np.full(B, tok[i], np.int32), False))
    return np.stack(rows, axis=1)  # [B, steps, V]


def test_decode_logits_vs_transformers(setup):
    hf, m, ids = setup
    ref = hf_logits(bf16_copy(hf), ids)[N0 - 1:]
    got = decode_logits(m.engine, ids)[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"bf16 decode logits vs transformers: relative error {rel:.3g}")
    assert np.isfinite(got).all()
    assert rel <= 3e-2


def check_deterministic_and_batch_invariant(eng, ids, slots=(1, 0)) -> None:
    """A second run gives the same bits, and a batch of two (in the given slots) gives each sequence the
    batch-1 bits (also used by test_cuda_persistent.py)."""
    once = decode_logits(eng, ids)[0]
    np.testing.assert_array_equal(decode_logits(eng, ids)[0], once)
    both = decode_logits(eng, ids, slots=slots)
    np.testing.assert_array_equal(both[0], once)
    np.testing.assert_array_equal(both[1], once)


def test_deterministic_and_batch_invariant(setup):
    _, m, ids = setup
    check_deterministic_and_batch_invariant(m.engine, ids)


def test_tensor_core_decode_kernel_vs_cuda_core(setup):
    _, m, ids = setup
    tc = decode_logits(m.engine, ids)[0]
    _cuda.set_decode_kernel(1)
    try:
        cc = decode_logits(m.engine, ids)[0]
    finally:
        _cuda.set_decode_kernel(2)
    rel = np.linalg.norm(tc - cc) / np.linalg.norm(cc)
    print(f"tensor-core vs warp-per-key decode kernel: relative logit difference {rel:.3g}")
    assert rel <= 1e-2


def test_graph_equals_ungraphed(setup):
    _, m, _ = setup
    prompts = [prompt_ids(120, seed=31), prompt_ids(7, seed=32)]
    m.engine.use_graphs = False
    try:
        plain = m.generate_ids(prompts, max_new_tokens=48, ignore_eos=True)
    finally:
        m.engine.use_graphs = True
    graphed = m.generate_ids(prompts, max_new_tokens=48, ignore_eos=True)
    assert graphed == plain
    assert m.engine.graphs_captured > 0


def test_time_graph_replays(setup):
    """The benchmark's GPU step time (the batch-1 decode graph replayed back to back): a positive time once a
    graphed greedy step has run, and a ValueError naming the batch where no graph was captured."""
    _, m, ids = setup
    eng = m.engine
    eng.clear_graphs()
    with pytest.raises(ValueError, match="batch 1"):
        eng.time_graph_replays(1, 3)
    m.generate_ids([prompt_ids(20, seed=33)], max_new_tokens=4, ignore_eos=True)
    assert eng.time_graph_replays(1, 5) > 0.0
    with pytest.raises(ValueError, match="batch 7"):
        eng.time_graph_replays(7, 3)


def test_decode_steps_bits(setup):
    """engine.decode_steps (n decode steps in one graph, each step embedding the ids the step before sampled on
    the device): the ids of n forward_sample calls fed back by hand, bit for bit, greedy and sampled, at batch 1 and
    2; where the steps would cross the cluster attention's key limit, only the steps before it (then the rest);
    generate() in chunks of 8 (the GPU default) equals one step a call, graphed and ungraphed."""
    _, m, ids = setup
    eng = m.engine
    prompt = np.array(ids[:N0], np.int32)
    for B, temp in ((1, 0.0), (2, 0.0), (2, 1.0)):
        slots = np.arange(B, dtype=np.int32)[::-1].copy()
        args = (np.full(B, temp, np.float32), np.full(B, 50, np.int32), np.full(B, 0.9, np.float32),
                np.arange(7, 7 + B).astype(np.uint64))

        def prefill():
            eng.reset_all()
            return eng.forward_sample(slots, np.full(B, N0, np.int32), np.tile(prompt, B), *args,
                                      np.zeros(B, np.uint64))

        first = prefill()
        by_hand, tok = [], first
        for k in range(8):
            tok = eng.forward_sample(slots, np.ones(B, np.int32), tok, *args, np.full(B, 1 + k, np.uint64))
            by_hand.append(tok)
        np.testing.assert_array_equal(prefill(), first)
        steps = eng.decode_steps(slots, first, *args, np.ones(B, np.uint64), 8)
        np.testing.assert_array_equal(steps, np.stack(by_hand))
        if _cuda.decode_cluster_supported():  # the limit 3 keys ahead: 3 steps, then the 5 beyond it
            prefill()
            eng.decode_cluster_max_keys = N0 + 3
            try:
                a = eng.decode_steps(slots, first, *args, np.ones(B, np.uint64), 8)
                assert a.shape == (3, B)
                b = eng.decode_steps(slots, a[-1], *args, np.full(B, 4, np.uint64), 5)
                assert b.shape == (5, B)
            finally:
                eng.decode_cluster_max_keys = 1024
                eng.clear_graphs()
            prefill()  # the same line crossed one step a call
            eng.decode_cluster_max_keys = N0 + 3
            try:
                tok, one = first, []
                for k in range(8):
                    tok = eng.forward_sample(slots, np.ones(B, np.int32), tok, *args, np.full(B, 1 + k, np.uint64))
                    one.append(tok)
            finally:
                eng.decode_cluster_max_keys = 1024
                eng.clear_graphs()
            np.testing.assert_array_equal(np.concatenate([a, b]), np.stack(one))
    prompts = [prompt_ids(120, seed=83), prompt_ids(9, seed=84)]
    assert m.decode_chunk == 8
    chunked = m.generate_ids(prompts, max_new_tokens=37, ignore_eos=True)
    m.decode_chunk = 1
    try:
        assert m.generate_ids(prompts, max_new_tokens=37, ignore_eos=True) == chunked
        eng.use_graphs = False
        assert m.generate_ids(prompts, max_new_tokens=37, ignore_eos=True) == chunked
    finally:
        m.decode_chunk, eng.use_graphs = 8, True


def test_prologues_change_no_bits(setup):
    """The kernels' PDL prologues (weights, norm weights, the residual row, RoPE angles and cached keys
    loaded before the wait for the kernel before; the new token's key after it) only move loads
    earlier: without them the logits keep their bits, ungraphed and graphed."""
    _, m, ids = setup
    eng = m.engine
    assert _cuda.pdl_prologue_enabled()
    on = decode_logits(eng, ids)[0]
    prompts = [prompt_ids(120, seed=41), prompt_ids(9, seed=42)]
    graphed_on = m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True)
    _cuda.set_pdl_prologue(False)
    eng.clear_graphs()
    try:
        np.testing.assert_array_equal(decode_logits(eng, ids)[0], on)
        assert m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True) == graphed_on
    finally:
        _cuda.set_pdl_prologue(True)
        eng.clear_graphs()


@pytest.mark.parametrize("knobs", [{}, {"fuse_residual_gemv": 0}, {"fuse_residual_gemv": 2}, {"fuse_qkv_rope": 1},
                                   {"fuse_qkv_rope": 2}, {"fuse_qkv_rope": 0, "fuse_qk_attention": 2},
                                   {"fuse_qkv_rope": 0, "decode_cluster": 0}],
                         ids=["default", "res-unfused", "res-fused-all", "qkv-rope-on", "qkv-rope-res",
                              "qk-in-cluster", "split-grid"])
def test_early_trigger_changes_no_bits(setup, knobs):
    """pdl_early_trigger (a kernel lets the next one launch at its entry instead of after its own wait) only lets
    later kernels become resident sooner: if a prologue read something a running kernel still writes (the
    residual row), bits would change. Every decode kernel sequence the engine can launch (residual steps fused
    or not, QK-norm + RoPE in the qkv product, in its own launch or in the attention, cluster or split grid),
    with no early trigger, the default stages (-1) and every stage (255: the o and down products too, their
    successors then reading the residual row after their wait): the same logits ungraphed, the same ids graphed."""
    _, m, ids = setup
    eng = m.engine
    assert eng.pdl_early_trigger == -1
    saved = {k: getattr(eng, k) for k in knobs}
    prompts = [prompt_ids(120, seed=43), prompt_ids(9, seed=44)]
    try:
        for k, v in knobs.items():
            setattr(eng, k, v)
        eng.pdl_early_trigger = 0
        eng.clear_graphs()
        late = decode_logits(eng, ids)[0]
        graphed_late = m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True)
        for bits in (-1, 255, 255):
            eng.pdl_early_trigger = bits
            eng.clear_graphs()
            np.testing.assert_array_equal(decode_logits(eng, ids)[0], late)
            assert m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True) == graphed_late
    finally:
        eng.pdl_early_trigger = -1
        for k, v in saved.items():
            setattr(eng, k, v)
        eng.clear_graphs()


def decode_logits_with(eng, ids, **knobs) -> np.ndarray:
    """decode_logits (slot 0) with engine attributes set for the call and restored after it."""
    saved = {k: getattr(eng, k) for k in knobs}
    for k, v in knobs.items():
        setattr(eng, k, v)
    try:
        return decode_logits(eng, ids)[0]
    finally:
        for k, v in saved.items():
            setattr(eng, k, v)


def test_one_split_decode_matches(setup):
    """decode_max_splits = 1 (the whole key range in one block per kv head, no partials) against the
    default splits: the same logits up to the order of the softmax combine (float32) and the bf16
    rounding of probabilities per tile (<= 1e-2 relative, as the CUDA-core comparison)."""
    _, m, ids = setup
    eng = m.engine
    many = decode_logits(eng, ids)[0]
    one = decode_logits_with(eng, ids, decode_max_splits=1)
    rel = np.linalg.norm(one - many) / np.linalg.norm(many)
    print(f"one split vs default splits: relative logit difference {rel:.3g}")
    assert rel <= 1e-2


def cluster_or_skip(eng):
    if not _cuda.decode_cluster_supported():
        pytest.skip("needs thread-block clusters (compute capability 9.0)")
    assert eng.decode_cluster == 8 and eng.decode_cluster_max_keys == 1024  # the defaults: on here


def test_cluster_decode_matches_split_grid(setup):
    """The decode attention's splits as one thread-block cluster combined through distributed shared memory
    (engine.decode_cluster, the default on sm_90 for key ranges up to decode_cluster_max_keys) against the
    one-wave split grid with its global partials: the same logits up to the softmax combine's order and
    the per-tile bf16 rounding of probabilities (<= 1e-2 relative, as the one-split comparison)."""
    _, m, ids = setup
    eng = m.engine
    cluster_or_skip(eng)
    clustered = decode_logits(eng, ids)[0]
    grid = decode_logits_with(eng, ids, decode_cluster=0)
    rel = np.linalg.norm(clustered - grid) / np.linalg.norm(grid)
    print(f"cluster vs split grid: relative logit difference {rel:.3g}")
    assert np.isfinite(clustered).all()
    assert rel <= 1e-2


def test_cluster_push_equals_pull(setup):
    """The cluster attention's split combine sending each block's slices into the others' shared memory
    (decode_cluster_push 1, the default) against each block pulling its slice (0): the same values in the
    same order, so the same logits bit for bit, through the model's attention."""
    _, m, ids = setup
    eng = m.engine
    cluster_or_skip(eng)
    found = _cuda.decode_cluster_push()
    got = {}
    try:
        for v in (1, 0):
            _cuda.set_decode_cluster_push(v)
            eng.clear_graphs()
            got[v] = decode_logits(eng, ids)[0]
    finally:
        _cuda.set_decode_cluster_push(found)
        eng.clear_graphs()
    assert np.isfinite(got[0]).all()
    np.testing.assert_array_equal(got[1], got[0])


def test_cluster_key_limit_crossing(setup):
    """With decode_cluster_max_keys = 150 the global layers leave the cluster for the split grid at the 151st
    key (local layers, window 8, stay). Teacher-forced logits: up to the line, the bits of the run that never
    leaves the cluster; beyond it, different bits from that run (the global layers did switch; the cache
    written before the line keeps the cluster's bits, so equality with the split grid's own run is only to
    1e-2, as in test_cluster_decode_matches_split_grid). Graphed greedy generation across the line (a graph
    per side) equals the ungraphed one at batch 2."""
    _, m, ids = setup
    eng = m.engine
    cluster_or_skip(eng)
    lim = 150
    clustered = decode_logits(eng, ids)[0]  # every step in the cluster (max keys 1024)
    window = eng.config.sliding_window
    assert 0 < window < N0
    eng.decode_cluster_max_keys = window     # every global layer on the split grid, local layers clustered
    eng.clear_graphs()
    try:
        grid = decode_logits(eng, ids)[0]
        eng.decode_cluster_max_keys = lim
        crossed = decode_logits(eng, ids)[0]
        # logits row i is the step that saw N0 + i keys
        k = lim - N0 + 1
        np.testing.assert_array_equal(crossed[:k], clustered[:k])
        assert not np.array_equal(crossed[k:], clustered[k:])
        rel = np.linalg.norm(crossed[k:] - grid[k:]) / np.linalg.norm(grid[k:])
        assert rel <= 1e-2, f"relative logit difference {rel:.3g}"
        prompts = [prompt_ids(140, seed=71), prompt_ids(9, seed=72)]
        eng.use_graphs = False
        plain = m.generate_ids(prompts, max_new_tokens=30, ignore_eos=True)
        eng.use_graphs = True
        eng.clear_graphs()
        assert m.generate_ids(prompts, max_new_tokens=30, ignore_eos=True) == plain
        assert eng.graphs_captured >= 2
    finally:
        eng.decode_cluster_max_keys = 1024
        eng.use_graphs = True
        eng.clear_graphs()


def test_fused_qk_attention_bits(setup):
    """The decode step's bf16 attention can do QK-norm + RoPE + the cache write itself (attention_decode_tc_qk,
    engine.fuse_qk_attention: 1, the default, where the attention runs on the split grid; 2 also in a
    cluster); 0: qk_rope_kv does them in its own launch. Same arithmetic (qk_prep.cuh), so the same bits,
    on the split grid (decode_cluster 0) and in a cluster: 200 teacher-forced steps (which read back every
    key the fused kernel wrote, across the local layers' ring wrap) and graphed greedy generation."""
    _, m, ids = setup
    eng = m.engine
    assert eng.fuse_qk_attention == 1
    prompts = [prompt_ids(120, seed=51), prompt_ids(9, seed=52)]
    clusters = (0, 8) if _cuda.decode_cluster_supported() else (0,)
    eng.fuse_qkv_rope = 0  # else the qkv product does QK-norm + RoPE and the attention is never fused
    try:
        for cl in clusters:
            eng.decode_cluster = cl
            eng.fuse_qk_attention = 2  # fused whatever the grid
            eng.clear_graphs()
            fused = decode_logits(eng, ids)[0]
            graphed = m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True)
            eng.fuse_qk_attention = 0
            eng.clear_graphs()
            np.testing.assert_array_equal(decode_logits(eng, ids)[0], fused)
            assert m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True) == graphed
    finally:
        eng.fuse_qk_attention, eng.decode_cluster, eng.fuse_qkv_rope = 1, 8, 0
        eng.clear_graphs()


def qkv_rope_used(eng, B: int = 1) -> bool:
    """Whether the engine's decode step at batch B runs gemv_qkv_rope (fuse_qkv_rope 1 or 2, where all its
    clusters are resident at once and the hidden size is at most qkv_rope_max_hidden)."""
    c = eng.config
    return (c.hidden_size <= eng.qkv_rope_max_hidden and
            _cuda.gemv_qkv_rope_max_clusters(B, c.hidden_size, c.head_dim, False) >= c.num_heads + 2 * c.num_kv_heads)


@pytest.mark.parametrize("qkv_rope", [2, 0], ids=["qkv_rope", "qkv_gemv"])
def test_fused_residual_gemv_bits(setup, qkv_rope):
    """The residual steps fused into the gate_up and qkv products (gemv_residual; with fuse_qkv_rope 2,
    gemv_qkv_rope, which also does QK-norm + RoPE) against residual_rmsnorm's own launches: the same bits at
    batch 1 and 2 (the one- and two-row kernels), ungraphed and graphed."""
    _, m, ids = setup
    eng = m.engine
    assert eng.fuse_residual_gemv == 1 and eng.fuse_qkv_rope == 0
    if qkv_rope and not qkv_rope_used(eng, 2):
        pytest.skip("gemv_qkv_rope is not used here")
    eng.fuse_qkv_rope = qkv_rope
    eng.fuse_residual_gemv = 0
    eng.clear_graphs()
    try:
        plain1, plain2 = decode_logits(eng, ids)[0], decode_logits(eng, ids, slots=(1, 0))
        prompts = [prompt_ids(120, seed=61), prompt_ids(9, seed=62)]
        graphed = m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True)
        for mode in (1, 2):  # where one wave (here: everywhere, tiny shapes), always
            eng.fuse_residual_gemv = mode
            eng.clear_graphs()
            np.testing.assert_array_equal(decode_logits(eng, ids)[0], plain1)
            np.testing.assert_array_equal(decode_logits(eng, ids, slots=(1, 0)), plain2)
            assert m.generate_ids(prompts, max_new_tokens=40, ignore_eos=True) == graphed
    finally:
        eng.fuse_residual_gemv, eng.fuse_qkv_rope = 1, 0
        eng.clear_graphs()


def test_qkv_rope_matches_two_launches(setup):
    """The qkv product with QK-norm, RoPE and the cache write in one kernel (gemv_qkv_rope, engine.fuse_qkv_rope
    1, for bf16 decode of 1-2 tokens on sm_90) against the qkv GEMV then qk_rope_kv (the default): the same
    arithmetic but the product's sums in another order, so <= 4e-3 relative over 200 teacher-forced steps (the
    bound of the persistent kernel's comparison, whose products also sum in another order). The default path
    against transformers is test_decode_logits_vs_transformers."""
    _, m, ids = setup
    eng = m.engine
    if not qkv_rope_used(eng):
        pytest.skip("gemv_qkv_rope is not used here (sm_90 thread-block clusters, all resident at once)")
    before = eng.qkv_rope_forwards
    fused = decode_logits_with(eng, ids, fuse_qkv_rope=1)
    assert eng.qkv_rope_forwards - before == len(ids) - N0  # every decode step ran it, the prefill did not
    before = eng.qkv_rope_forwards
    two = decode_logits(eng, ids)[0]
    assert eng.qkv_rope_forwards == before
    rel = np.linalg.norm(fused - two) / np.linalg.norm(two)
    print(f"qkv + QK-norm + RoPE in one kernel vs two launches: relative logit difference {rel:.3g}")
    assert np.isfinite(fused).all()
    assert rel <= 4e-3


@pytest.fixture(scope="module")
def wide_ffn(tmp_path_factory, tokenizer_model):
    """A model whose gate_up product at batch 1 is the plain GEMV over about two waves of blocks on an H100 or H200
    (8200 outputs, 8 a block: 1025 blocks, 4 of which an SM holds), as 4B's is over ten."""
    hf = make_hf_model("gemma3", seed=8, intermediate_size=8200)
    d = save_checkpoint(hf, tmp_path_factory.mktemp("wide") / "ck", tokenizer_model)
    return g3.load(d, device="cuda", dtype="bfloat16", max_batch=1, max_context=256)


def test_gate_up_l2_prefetch_changes_no_bits(wide_ffn):
    """The o product's L2 prefetch of the gate_up rows after that product's first wave of blocks
    (gate_up_l2_prefetch_kb, on by default on sm_90 where gate_up is the plain GEMV beyond one wave) is only a
    hint: with it off, on at the default 4 MB and asked for far more than the weight holds (clipped to its last
    row), the same logits ungraphed and the same ids graphed; and every decode step was given it."""
    m = wide_ffn
    eng = m.engine
    if not _cuda.decode_cluster_supported():  # the same test of the device: compute capability 9.0
        pytest.skip("cp.async.bulk.prefetch needs compute capability 9.0")
    assert eng.gate_up_l2_prefetch_kb == 4096
    ids = prompt_ids(160, seed=71)
    prompts = [prompt_ids(50, seed=72)]
    eng.fuse_residual_gemv = 0  # gate_up as the plain GEMV (the default fuses a grid of up to four waves)
    try:
        eng.gate_up_l2_prefetch_kb = 0
        eng.clear_graphs()
        before = eng.l2_prefetch_forwards
        off = decode_logits(eng, ids)[0]
        graphed_off = m.generate_ids(prompts, max_new_tokens=30, ignore_eos=True)
        assert eng.l2_prefetch_forwards == before
        for kb in (4096, 1 << 20):
            eng.gate_up_l2_prefetch_kb = kb
            eng.clear_graphs()
            before = eng.l2_prefetch_forwards
            np.testing.assert_array_equal(decode_logits(eng, ids)[0], off)
            assert eng.l2_prefetch_forwards - before == len(ids) - N0  # every decode step, not the prefill
            assert m.generate_ids(prompts, max_new_tokens=30, ignore_eos=True) == graphed_off
    finally:
        eng.fuse_residual_gemv, eng.gate_up_l2_prefetch_kb = 1, 4096
        eng.clear_graphs()


def test_fused_short(setup):
    """6 teacher-forced steps after a 60-token prefill at batch 2, short enough for compute-sanitizer
    racecheck (run_gpu.sh). With the qkv GEMV: both fusions forced on (the residual steps in every GEMV,
    QK-norm + RoPE in the decode attention, in a cluster where the device has them) against both off, the
    same bits, also with every stage's PDL early trigger (the residual row read after the wait). With
    gemv_qkv_rope (where used): the residual step inside it against its own launch, the same bits, and within
    4e-3 of the two-launch path (test_qkv_rope_matches_two_launches)."""
    _, m, ids = setup
    eng = m.engine
    short = ids[:66]
    eng.fuse_residual_gemv, eng.fuse_qk_attention, eng.fuse_qkv_rope = 0, 0, 0
    try:
        plain = decode_logits(eng, short, slots=(0, 1), n0=60)
        eng.fuse_residual_gemv, eng.fuse_qk_attention = 2, 2
        np.testing.assert_array_equal(decode_logits(eng, short, slots=(0, 1), n0=60), plain)
        eng.pdl_early_trigger = 255
        np.testing.assert_array_equal(decode_logits(eng, short, slots=(0, 1), n0=60), plain)
        eng.pdl_early_trigger = -1
        if qkv_rope_used(eng, 2):
            eng.fuse_qkv_rope = 2
            fused = decode_logits(eng, short, slots=(0, 1), n0=60)
            eng.fuse_qkv_rope = 1
            np.testing.assert_array_equal(decode_logits(eng, short, slots=(0, 1), n0=60), fused)
            rel = np.linalg.norm(fused - plain) / np.linalg.norm(plain)
            assert rel <= 4e-3, rel
    finally:
        eng.fuse_residual_gemv, eng.fuse_qk_attention, eng.fuse_qkv_rope = 1, 1, 0
        eng.pdl_early_trigger = -1
