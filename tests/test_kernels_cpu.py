"""Every CPU kernel against a numpy float64 reference, on fresh random inputs of odd sizes.
Tolerances are for float32 arithmetic against float64: relative 1e-5 or a few float32 ulps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gemma3_native import _native as core
from gemma3_native.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

RTOL = 2e-5


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(got)), "non-finite output"
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w.astype(np.float64))


def test_embedding(rng):
    V, H, n = 37, 53, 11
    table = rng.standard_normal((V, H)).astype(np.float32)
    ids = rng.integers(0, V, n).astype(np.int32)
    scale = math.sqrt(H)
    got = core.embedding(table, ids, scale)
    np.testing.assert_allclose(got, table[ids].astype(np.float64) * np.float32(scale), rtol=1e-6)
    bits = f32_to_bf16_bits(table)
    got_b = core.embedding(bits, ids, 25.25)
    np.testing.assert_allclose(got_b, bf16_bits_to_f32(bits)[ids].astype(np.float64) * 25.25, rtol=1e-6)
    with pytest.raises(IndexError):
        core.embedding(table, np.array([V], np.int32), 1.0)


@pytest.mark.parametrize("rows,dim", [(1, 7), (13, 129), (5, 640)])
def test_rmsnorm(rng, rows, dim):
    x = rng.standard_normal((rows, dim)).astype(np.float32) * 3
    w = rng.standard_normal(dim).astype(np.float32)
    assert rel_err(core.rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6)) < RTOL


def test_qk_norm(rng):
    rows, heads, d = 9, 3, 34
    x = rng.standard_normal((rows, heads, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    assert rel_err(core.qk_norm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6)) < RTOL


@pytest.mark.parametrize("post", [True, False])
def test_residual_rmsnorm(rng, post):
    rows, dim = 7, 97
    resid = rng.standard_normal((rows, dim)).astype(np.float32)
    delta = rng.standard_normal((rows, dim)).astype(np.float32)
    pw = rng.standard_normal(dim).astype(np.float32) if post else None
    nw = rng.standard_normal(dim).astype(np.float32)
    new_resid, out = core.residual_rmsnorm(resid, delta, pw, nw, 1e-6)
    r = resid.astype(np.float64) + (rmsnorm_ref(delta, pw, 1e-6) if post else delta)
    assert rel_err(new_resid, r) < RTOL
    assert rel_err(out, rmsnorm_ref(r, nw, 1e-6)) < RTOL


def rope_ref(x, pos, theta, factor):
    d = x.shape[-1]
    half = d // 2
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) / factor
    ang = pos.astype(np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@pytest.mark.parametrize("theta,factor,d", [(10000.0, 1.0, 38), (1e6, 8.0, 256), (1e6, 1.0, 128)])
def test_rope_inv_freq(theta, factor, d):
    """The one definition of RoPE's float32 inverse frequencies (the CPU kernel's, the CUDA engine's, the kernel
    tests' references): the exponent 2i/d in float32 as transformers takes it, then within 2 float32 ulps of
    (1 / theta^e) / factor in float64 (powf and the division each round once)."""
    got = core.rope_inv_freq(d, theta, factor)
    e = (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)).astype(np.float64)
    ref = 1.0 / np.float64(theta) ** e / factor
    assert got.dtype == np.float32 and got.shape == (d // 2,)
    assert (np.abs(got - ref) <= 2 * np.spacing(got)).all()
    with pytest.raises(ValueError, match="head_dim"):
        core.rope_inv_freq(7, theta, factor)


@pytest.mark.parametrize("theta,factor", [(10000.0, 1.0), (1e6, 8.0)])
def test_rope(rng, theta, factor):
    rows, heads, d = 11, 3, 38
    x = rng.standard_normal((rows, heads, d)).astype(np.float32)
    pos = rng.integers(0, 3000, rows).astype(np.int32)
    # float32 angles at positions ~3000 carry ~1e-4 absolute phase error, as in transformers
    assert rel_err(core.rope(x, pos, theta, factor), rope_ref(x, pos, theta, factor)) < 3e-4
    small = np.arange(rows, dtype=np.int32)
    assert rel_err(core.rope(x, small, theta, factor), rope_ref(x, small, theta, factor)) < RTOL


def attention_ref(q, k, v, window, scale, softcap):
    """Full-sequence causal attention in float64: q [n, H, D], k/v [n, KVH, D]."""
    n, H, D = q.shape
    KVH = k.shape[1]
    out = np.zeros((n, H, D))
    for i in range(n):
        lo = max(0, i - window + 1) if window else 0
        for h in range(H):
            g = h // (H // KVH)
            s = (k[lo:i + 1, g].astype(np.float64) @ q[i, h].astype(np.float64)) * scale
            if softcap:
                s = np.tanh(s / softcap) * softcap
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = p @ v[lo:i + 1, g].astype(np.float64)
    return out


@pytest.mark.parametrize("H,KVH,D,window,cap_kind,softcap,chunks", [
    (6, 2, 13, 0, "full", 0.0, [23]),              # causal, one chunk
    (6, 2, 13, 0, "full", 0.0, [5, 1, 9, 1, 7]),   # chunked prefill + single-token decode steps
    (6, 2, 13, 6, "ring", 0.0, [17, 1, 1, 9]),     # sliding window with a ring buffer that wraps within and across chunks
    (6, 2, 13, 6, "ring", 3.0, [3, 3, 1, 11, 5]),  # plus soft-cap
    (6, 2, 13, 5, "full", 0.0, [13, 2]),           # sliding window over a full-length cache (Gemma 2 style)
    # queries that see more than one 64-key block: the blocks' results combine (chunks of many queries run
    # their (query, kv head) pairs in parallel, decode steps their blocks)
    (4, 1, 67, 0, "full", 0.0, [150, 1, 1, 70, 1]),    # MQA 4:1 (one kv head: decode steps split their blocks)
    (4, 2, 67, 0, "full", 0.0, [131, 1, 64, 1]),       # GQA 2:1, key counts on and off the 64-key blocks
    (4, 1, 67, 100, "ring", 2.5, [97, 1, 130, 1, 1]),  # ring of 100 wrapping, soft-cap
])
def test_attention_chunks(rng, H, KVH, D, window, cap_kind, softcap, chunks):
    n = sum(chunks)
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((n, KVH, D)).astype(np.float32)
    v = rng.standard_normal((n, KVH, D)).astype(np.float32)
    scale = 1 / math.sqrt(D)
    cap = window if cap_kind == "ring" else n
    kc = np.full((KVH, cap, D), np.nan, np.float32)  # poison: reading an unwritten slot shows up as NaN
    vc = np.full((KVH, cap, D), np.nan, np.float32)
    outs, start = [], 0
    for c in chunks:
        sl = slice(start, start + c)
        outs.append(core.attention(q[sl], k[sl], v[sl], kc, vc, start, window, scale, softcap, True))
        start += c
    got = np.concatenate(outs)
    assert rel_err(got, attention_ref(q, k, v, window, scale, softcap)) < RTOL


def test_attention_bits_independent_of_threads_and_path(rng):
    """A query's output bits are those of its key blocks combined in order, however the work is spread: one
    thread or two, the query alone (a decode step: blocks in parallel) or inside a chunk (pairs in parallel)."""
    H, KVH, D, n0 = 4, 1, 64, 200
    q = rng.standard_normal((n0 + 1, H, D)).astype(np.float32)
    k = rng.standard_normal((n0 + 1, KVH, D)).astype(np.float32)
    v = rng.standard_normal((n0 + 1, KVH, D)).astype(np.float32)
    before = core.num_threads()
    try:
        got = {}
        for threads in (1, 2):
            core.set_num_threads(threads)
            kc = np.zeros((KVH, n0 + 1, D), np.float32)
            vc = np.zeros_like(kc)
            whole = core.attention(q, k, v, kc.copy(), vc.copy(), 0, 0, 0.125, 0.0, False)
            core.attention(q[:n0], k[:n0], v[:n0], kc, vc, 0, 0, 0.125, 0.0, True)
            step = core.attention(q[n0:], k[n0:], v[n0:], kc, vc, n0, 0, 0.125, 0.0, False)
            got[threads] = (whole, step)
        assert np.array_equal(got[1][0], got[2][0])
        assert np.array_equal(got[1][1], got[2][1])
        assert np.array_equal(got[2][0][n0:], got[2][1])  # the last query: inside the chunk == as a decode step
    finally:
        core.set_num_threads(before)


def test_geglu(rng):
    rows, F = 5, 67
    gu = (rng.standard_normal((rows, 2 * F)) * 3).astype(np.float32)
    g, u = gu[:, :F].astype(np.float64), gu[:, F:].astype(np.float64)
    ref = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    assert rel_err(core.geglu(gu), ref) < RTOL


@pytest.mark.parametrize("T,K,N", [(1, 13, 7), (1, 640, 1031), (3, 67, 5), (37, 129, 61), (130, 72, 9)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul(rng, T, K, N, dtype):
    x = rng.standard_normal((T, K)).astype(np.float32)
    w32 = rng.standard_normal((N, K)).astype(np.float32)
    w = w32 if dtype == "float32" else f32_to_bf16_bits(w32)
    wref = w32 if dtype == "float32" else bf16_bits_to_f32(w)
    ref = x.astype(np.float64) @ wref.astype(np.float64).T
    assert rel_err(core.matmul(x, w), ref) < 1e-5 * math.sqrt(K / 64 + 1)


@pytest.mark.parametrize("T,K,N", [(9, 200, 45), (70, 203, 13)])  # K % 8 tails, partial weight groups, 2 tiles
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_batch_invariant(rng, T, K, N, dtype):
    """A row's result does not depend on the rows batched with it (batched == unbatched, bitwise): one row
    (the decode path, bf16 converted in the loop), two, or many (3 rows a pass on converted weights)."""
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    if dtype == "bfloat16":
        w = f32_to_bf16_bits(w)
    full = core.matmul(x, w)
    for t in range(T):
        assert np.array_equal(core.matmul(x[t:t + 1], w)[0], full[t])
    assert np.array_equal(core.matmul(x[1:3], w), full[1:3])


def test_softcap(rng):
    x = (rng.standard_normal((3, 17)) * 20).astype(np.float32)
    assert rel_err(core.softcap(x, 7.5), np.tanh(x.astype(np.float64) / 7.5) * 7.5) < RTOL


def test_argmax_first_max():
    l = np.array([[0.0, 3.0, 3.0, -1.0], [5.0, 1.0, 5.0, 5.0]], np.float32)
    assert core.argmax(l) == [1, 0]


def test_sampling_distribution_and_filters(rng):
    V = 11
    logits = rng.standard_normal((1, V)).astype(np.float32) * 2
    n = 4000
    ids = [core.sample(logits, [0.7], [0], [1.0], [1234], [c])[0] for c in range(n)]
    p = np.exp(logits[0].astype(np.float64) / 0.7)
    p /= p.sum()
    freq = np.bincount(ids, minlength=V) / n
    assert np.abs(freq - p).max() < 4 * math.sqrt(0.25 / n) + 1e-3  # within 4 sigma
    # top-k keeps exactly the k most likely
    top3 = set(np.argsort(-logits[0])[:3].tolist())
    assert {core.sample(logits, [1.0], [3], [1.0], [7], [c])[0] for c in range(300)} <= top3
    # top-p keeps the smallest prefix reaching p
    p1 = np.exp(logits[0].astype(np.float64) - logits[0].max())
    p1 /= p1.sum()
    order = np.argsort(-p1)
    keep = set(order[: int(np.searchsorted(np.cumsum(p1[order]), 0.5) + 1)].tolist())
    assert {core.sample(logits, [1.0], [0], [0.5], [9], [c])[0] for c in range(300)} <= keep
    # same (seed, counter) -> same draw; temperature 0 -> argmax
    assert core.sample(logits, [1.0], [0], [1.0], [5], [17]) == core.sample(logits, [1.0], [0], [1.0], [5], [17])
    assert core.sample(logits, [0.0], [0], [1.0], [5], [17]) == core.argmax(logits)


def test_uniform_from_range_and_spread():
    u = np.array([core.uniform_from(42, c) for c in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005


def masked_attention_ref(q, k, v, visible, scale):
    n, H, D = q.shape
    KVH = k.shape[1]
    out = np.zeros((n, H, D))
    for i in range(n):
        js = np.nonzero(visible[i])[0]
        for h in range(H):
            g = h // (H // KVH)
            s = (k[js, g].astype(np.float64) @ q[i, h].astype(np.float64)) * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[js, g].astype(np.float64)
    return out


@pytest.mark.parametrize("window", [0, 7])
def test_attention_bidirectional_image_blocks(rng, window):
    """Tokens of one image see each other (transformers: OR(causal, same block), AND window on local layers)."""
    H, KVH, D = 4, 2, 9
    n0, n = 6, 20  # a cached prefix, then a chunk holding two image blocks
    blocks = np.full(n0 + n, -1)
    blocks[n0 + 2:n0 + 7] = 0
    blocks[n0 + 9:n0 + 15] = 1
    total = n0 + n
    q = rng.standard_normal((total, H, D)).astype(np.float32)
    k = rng.standard_normal((total, KVH, D)).astype(np.float32)
    v = rng.standard_normal((total, KVH, D)).astype(np.float32)
    vis = np.zeros((total, total), bool)
    for i in range(total):
        for j in range(total):
            same = blocks[i] >= 0 and blocks[i] == blocks[j]
            vis[i, j] = (j <= i or same) and (window == 0 or j > i - window)
    ext = np.array([max(i, max([j for j in range(total) if blocks[i] >= 0 and blocks[j] == blocks[i]], default=i))
                    for i in range(n0, total)], np.int32)
    cap = window or total
    kc = np.full((KVH, cap, D), np.nan, np.float32)
    vc = np.full((KVH, cap, D), np.nan, np.float32)
    scale = 0.3
    core.attention(q[:n0], k[:n0], v[:n0], kc, vc, 0, window, scale, 0.0, True)
    got = core.attention(q[n0:], k[n0:], v[n0:], kc, vc, n0, window, scale, 0.0, True, ext)
    assert rel_err(got, masked_attention_ref(q, k, v, vis, scale)[n0:]) < RTOL


def ref_sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, seed: int, counter: int) -> int:
    """sampling.cpp's algorithm in Python, step by step (float64 sums in the same order)."""
    V = len(logits)
    k = top_k if 0 < top_k < V else V
    order = sorted(range(V), key=lambda i: (-float(logits[i]), i))[:k]
    t = float(np.float32(temperature))
    mx = float(logits[order[0]])
    p = [math.exp((float(logits[i]) - mx) / t) for i in order]
    total = 0.0
    for x in p:
        total += x
    keep = len(order)
    tp = float(np.float32(top_p))
    if 0.0 < tp < 1.0:
        c = 0.0
        for i, x in enumerate(p):
            c += x / total
            if c >= tp:
                keep = i + 1
                break
    kept = 0.0
    for x in p[:keep]:
        kept += x
    u = core.uniform_from(seed, counter) * kept
    c = 0.0
    for i in range(keep):
        c += p[i]
        if u < c:
            return order[i]
    return order[keep - 1]


@pytest.mark.parametrize("V,top_k", [(4999, 64), (4999, 1), (4999, 4998), (4999, 0), (262144, 64)])
def test_sampling_exact_draws(rng, V, top_k):
    """The exact draw of the reference algorithm, with many tied logits (ties go to the lower id) and the
    top-k boundary inside a run of ties."""
    logits = np.round(rng.standard_normal(V) * 4) / 2  # coarse: long runs of equal logits
    logits = logits.astype(np.float32)
    draws = 3 if V > 100000 else 12
    for c in range(draws):
        got = core.sample(logits[None], [0.8], [top_k], [0.95], [77], [c])[0]
        assert got == ref_sample(logits, 0.8, top_k, 0.95, 77, c), (V, top_k, c)
