"""Each CUDA kernel against the CPU kernel (gemma3_native._core) or numpy, on random odd sizes.

Tolerances (stated per test): float32 kernels agree with the CPU kernels to float32 rounding
(<= 2e-6 relative unless the kernel sums in a different order: products <= 1e-5 relative to the
float64 reference). bf16 outputs are compared with the float32 reference rounded to bf16: at most one
bf16 ulp apart (2^-7 relative) plus 1e-6. Attention in bf16 (probabilities rounded to bf16 before the
P.V product, as flash kernels do): ||out - ref|| / ||ref|| <= 1e-2. Sampling: ids identical."""
from __future__ import annotations

import numpy as np
import pytest

from gemma3_native import _core

try:
    from gemma3_native import _cuda
    HAVE_GPU = _cuda.device_count() > 0
except ImportError:  # built without the CUDA backend
    _cuda = None
    HAVE_GPU = False

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a GPU")]

ULP = 2.0 ** -7


def bf16_round(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return (bf16_round(x).view(np.uint32) >> 16).astype(np.uint16)


def assert_bf16_close(got, ref):
    ref_r = bf16_round(ref)
    bad = np.abs(got - ref_r) > ULP * np.abs(ref_r) + 1e-6
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ by more than one bf16 ulp; max |diff| " \
                          f"{np.abs(got - ref_r).max():.3g}"


def assert_f32_close(got, ref, rtol=2e-6):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} x {scale:.3g}"


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("H", [72, 1153, 2560, 5376, 6145])  # 4 to 24 elements a thread; 6145: the loop kernel
def test_embedding_with_first_norm(rng, bf, H):
    V, n = 301, 37
    table = randn(rng, V, H)
    ids = rng.integers(0, V, n).astype(np.int32)
    w = randn(rng, H, scale=0.3)
    scale = float(np.float32(np.sqrt(H)))
    if bf:
        table = bf16_round(table)
        scale = float(bf16_round(np.array([scale], np.float32))[0])
    x, xn = _cuda.k_embedding(table, ids, scale, w, 1e-6, bf)
    ref_x = _core.embedding(bf16_bits(table) if bf else table, ids, scale)
    np.testing.assert_array_equal(x, ref_x)
    ref_xn = _core.rmsnorm(ref_x, w, 1e-6)
    (assert_bf16_close if bf else assert_f32_close)(xn, ref_xn)


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("dim", [48, 1001, 7000])
def test_rmsnorm(rng, bf, dim):
    x = randn(rng, 13, dim, scale=3.0)
    w = randn(rng, dim, scale=0.3)
    got = _cuda.k_rmsnorm(x, w, 1e-6, bf)
    ref = _core.rmsnorm(x, w, 1e-6)
    (assert_bf16_close if bf else assert_f32_close)(got, ref)


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("dim", [48, 1100, 2561, 3900, 5376, 7001])  # 4-24 per thread; 7001: the wide kernel
@pytest.mark.parametrize("post", [True, False])
def test_residual_rmsnorm(rng, bf, dim, post):
    rows = 11
    resid = randn(rng, rows, dim, scale=5.0)
    delta = randn(rng, rows, dim, scale=2.0)
    pw = randn(rng, dim, scale=0.3) if post else None
    nw = randn(rng, dim, scale=0.3)
    r, out = _cuda.k_residual_rmsnorm(resid, delta, pw, nw, 1e-6, bf)
    ref_r, ref_out = _core.residual_rmsnorm(resid, delta, pw, nw, 1e-6)
    assert_f32_close(r, ref_r)
    (assert_bf16_close if bf else assert_f32_close)(out, ref_out)


@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("NH,KVH,D", [(4, 1, 256), (8, 4, 128), (6, 2, 16), (4, 2, 12)])
@pytest.mark.parametrize("qknorm", [True, False])
def test_qk_norm_rope(rng, bf, NH, KVH, D, qknorm):
    T, start = 9, 4093
    theta, factor = (1e6, 8.0) if D >= 128 else (1e4, 1.0)
    qkv = randn(rng, T, (NH + 2 * KVH) * D, scale=2.0)
    qw = randn(rng, D, scale=0.3) if qknorm else None
    kw = randn(rng, D, scale=0.3) if qknorm else None
    q, k, v = _cuda.k_qk_rope(qkv, start, NH, KVH, D, qw, kw, theta, factor, 1e-6, bf)
    pos = np.arange(start, start + T, dtype=np.int32)
    rq = qkv[:, :NH * D].reshape(T, NH, D).copy()
    rk = qkv[:, NH * D:(NH + KVH) * D].reshape(T, KVH, D).copy()
    rv = qkv[:, (NH + KVH) * D:].reshape(T, KVH, D).copy()
    if qknorm:
        rq = _core.qk_norm(rq, qw, 1e-6)
        rk = _core.qk_norm(rk, kw, 1e-6)
    rq = _core.rope(rq, pos, theta, factor)
    rk = _core.rope(rk, pos, theta, factor)
    check = assert_bf16_close if bf else (lambda g, r: assert_f32_close(g, r, 1e-5))
    check(q, rq)
    check(k, rk)
    check(v, rv)


ATTN_CASES = [
    # NH, KVH, D, n, start, window, cap, softcap
    (4, 1, 256, 130, 0, 0, 300, 0.0),      # 270M/1B shape, global, two query tiles + a partial one
    (4, 1, 256, 77, 600, 64, 64, 0.0),     # local ring, chunk longer than the window after a wrap
    (8, 4, 128, 70, 45, 0, 200, 0.0),      # 4B-like GQA 2:1, global, prior cache
    (8, 4, 128, 150, 30, 50, 50, 3.0),     # local, chunk > window, soft-cap
    (6, 2, 16, 41, 13, 8, 8, 0.0),         # tiny gemma3-like: window 8
    (4, 2, 12, 23, 9, 0, 40, 2.0),         # tiny gemma2-like: soft-cap, odd head dim
]


def ref_attention(q, kn, vn, kc, vc, start, window, scale, softcap):
    kc2, vc2 = kc.copy(), vc.copy()
    out = _core.attention(q, kn, vn, kc2, vc2, start, window, scale, softcap, True)
    return out, kc2, vc2


# The tensor-core kernel takes head_dim 128 and 256 only: other cases are not generated for it.
ATTN_PARAMS = [(c, p, b) for c in ATTN_CASES for p, b in [("generic", False), ("generic", True), ("tc", True)]
               if p != "tc" or c[2] in (128, 256)]


@pytest.mark.parametrize("case,path,bf", ATTN_PARAMS)
def test_prefill_attention(rng, case, path, bf):
    NH, KVH, D, n, start, window, cap, softcap = case
    q, kn, vn = randn(rng, n, NH, D), randn(rng, n, KVH, D), randn(rng, n, KVH, D)
    kc, vc = randn(rng, KVH, cap, D), randn(rng, KVH, cap, D)
    if bf:
        q, kn, vn, kc, vc = map(bf16_round, (q, kn, vn, kc, vc))
    scale = 1.0 / np.sqrt(D) * 2.0
    out, gkc, gvc = _cuda.k_attention(q, kn, vn, kc, vc, start, window, scale, softcap, bf, path)
    ref, rkc, rvc = ref_attention(q, kn, vn, kc, vc, start, window, scale, softcap)
    np.testing.assert_array_equal(gkc, rkc)  # the ring write: same slots, same values
    np.testing.assert_array_equal(gvc, rvc)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert np.isfinite(out).all()
    assert rel <= (1e-2 if bf else 1e-5), f"relative error {rel:.3g}"


def decode_params(cases, nsplits):
    """(case, bf16, nsplit, path) for the decode kernels: the CUDA-core ones for both types (they use at
    most 32 splits, so a larger nsplit tests that clamp), the tensor-core one (decode_tc) only where it
    applies: bf16, head_dim 128/256, at most 8 query heads per kv head."""
    out = []
    for i, c in enumerate(cases):
        NH, KVH, D = c[:3]
        for bf in (False, True):
            for path in ("decode", "decode_warp", "decode_tc"):
                if path == "decode_tc" and not (bf and D in (128, 256) and NH // KVH <= 8):
                    continue
                out += [pytest.param(c, bf, ns, path, id=f"case{i}-{'bf16' if bf else 'f32'}-ns{ns}-{path}")
                        for ns in nsplits]
    return out


@pytest.mark.parametrize("case,bf,nsplit,path", decode_params(ATTN_CASES, [1, 3, 32, 128]))
def test_decode_attention(rng, case, bf, nsplit, path):
    NH, KVH, D, _, start, window, cap, softcap = case
    start = start + 37 if window else min(start + 37, cap - 1)
    q, kn, vn = randn(rng, 1, NH, D), randn(rng, 1, KVH, D), randn(rng, 1, KVH, D)
    kc, vc = randn(rng, KVH, cap, D), randn(rng, KVH, cap, D)
    if bf:
        q, kn, vn, kc, vc = map(bf16_round, (q, kn, vn, kc, vc))
    scale = 1.0 / np.sqrt(D)
    out, gkc, gvc = _cuda.k_attention(q, kn, vn, kc, vc, start, window, scale, softcap, bf, path, nsplit)
    ref, rkc, rvc = ref_attention(q, kn, vn, kc, vc, start, window, scale, softcap)
    np.testing.assert_array_equal(gkc, rkc)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= (1e-2 if bf else 1e-5), f"relative error {rel:.3g}"


LONG_DECODE = [
    # NH, KVH, D, start, window, cap, softcap: many splits, ring wrapped many times
    (4, 1, 256, 2900, 0, 3000, 0.0),
    (8, 4, 128, 5000, 1024, 1024, 0.0),
    (4, 2, 12, 700, 0, 800, 2.0),
    (8, 1, 256, 900, 512, 512, 0.0),   # 8 query heads per kv head
    (16, 8, 128, 3000, 0, 3100, 0.0),  # 27B-like head dim and GQA
]


@pytest.mark.parametrize("case,bf,nsplit,path", decode_params(LONG_DECODE, [5, 32, 128]))
def test_decode_attention_long(rng, case, bf, nsplit, path):
    NH, KVH, D, start, window, cap, softcap = case
    q, kn, vn = randn(rng, 1, NH, D), randn(rng, 1, KVH, D), randn(rng, 1, KVH, D)
    kc, vc = randn(rng, KVH, cap, D), randn(rng, KVH, cap, D)
    if bf:
        q, kn, vn, kc, vc = map(bf16_round, (q, kn, vn, kc, vc))
    scale = 3.0 / np.sqrt(D)
    out, gkc, _ = _cuda.k_attention(q, kn, vn, kc, vc, start, window, scale, softcap, bf, path, nsplit)
    ref, rkc, _ = ref_attention(q, kn, vn, kc, vc, start, window, scale, softcap)
    np.testing.assert_array_equal(gkc, rkc)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= (1e-2 if bf else 1e-5), f"relative error {rel:.3g}"

# the cluster combine (decode_tc_cluster): bf16, head_dim 128/256; key counts from 1 (7 of 8 blocks hold no
# key) through ranges of several 64-key tiles per block (long cases), rings wrapped
CLUSTER_CASES = [c[:3] + (s, c[5], c[6], c[7]) for c in ATTN_CASES if c[2] in (128, 256)
                 for s in (0, 20, min(c[4] + 37, c[6] - 1) if not c[5] else c[4] + 37)] + \
                [c for c in LONG_DECODE if c[2] in (128, 256)]


def cluster_attention(case, nsplit, push, inputs):
    """decode_tc_cluster with its splits combined by sending slices with st.async (1, the default) or by
    pulling them between two cluster barriers (0)"""
    NH, KVH, D, start, window, cap, softcap = case
    found = _cuda.decode_cluster_push()
    _cuda.set_decode_cluster_push(push)
    try:
        return _cuda.k_attention(*inputs, start, window, 2.0 / np.sqrt(D), softcap, True, "decode_tc_cluster", nsplit)
    finally:
        _cuda.set_decode_cluster_push(found)


def cluster_inputs(rng, case):
    NH, KVH, D, start, window, cap, softcap = case
    q, kn, vn = randn(rng, 1, NH, D), randn(rng, 1, KVH, D), randn(rng, 1, KVH, D)
    kc, vc = randn(rng, KVH, cap, D), randn(rng, KVH, cap, D)
    return tuple(map(bf16_round, (q, kn, vn, kc, vc)))


@pytest.mark.skipif(not HAVE_GPU or not _cuda.decode_cluster_supported(), reason="needs thread-block clusters")
@pytest.mark.parametrize("push", [1, 0])
@pytest.mark.parametrize("nsplit", [2, 5, 8])
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=[f"c{i}" for i in range(len(CLUSTER_CASES))])
def test_decode_attention_cluster(rng, case, nsplit, push):
    NH, KVH, D, start, window, cap, softcap = case
    inputs = cluster_inputs(rng, case)
    out, gkc, _ = cluster_attention(case, nsplit, push, inputs)
    ref, rkc, _ = ref_attention(*inputs, start, window, 2.0 / np.sqrt(D), softcap)
    np.testing.assert_array_equal(gkc, rkc)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert np.isfinite(out).all()
    assert rel <= 1e-2, f"relative error {rel:.3g}"


@pytest.mark.skipif(not HAVE_GPU or not _cuda.decode_cluster_supported(), reason="needs thread-block clusters")
@pytest.mark.parametrize("nsplit", [3, 8])
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=[f"c{i}" for i in range(len(CLUSTER_CASES))])
def test_decode_cluster_push_equals_pull(rng, case, nsplit):
    """The cluster combines compute the same values in the same order: the same bits."""
    inputs = cluster_inputs(rng, case)
    np.testing.assert_array_equal(cluster_attention(case, nsplit, 1, inputs)[0],
                                  cluster_attention(case, nsplit, 0, inputs)[0])


@pytest.mark.parametrize("bf", [False, True])
def test_geglu(rng, bf):
    gu = randn(rng, 7, 2 * 1001, scale=3.0)
    got = _cuda.k_geglu(gu, bf)
    ref = _core.geglu(gu)
    (assert_bf16_close if bf else (lambda g, r: assert_f32_close(g, r, 4e-6)))(got, ref)


GEMM_SHAPES = [(1, 640, 1001, 1), (3, 72, 37, 1), (8, 1160, 513, 1), (5, 6912, 129, 1), (1, 10240, 7, 1),
               (2, 2560, 2048, 0), (13, 136, 301, 2), (33, 1152, 999, 0), (1, 50, 77, 0)]
# decode GEMVs whose grid at the old warps-per-row rule is one to four waves on an H100, so that the wave rule
# (gemv_mode 2) gives them more rows per block: 1B's down product, 4B's o, qkv and down products, odd N
WAVE_SHAPES = [(1, 6912, 1153), (2, 2048, 2561), (1, 2560, 4097), (1, 10240, 1501), (1, 10240, 2561)]
GEMM_SHAPES += [(M, K, N, 1) for M, K, N in WAVE_SHAPES]


# path 1 (our GEMV) takes bf16 only: float32 cases are generated for the other paths.
@pytest.mark.parametrize("M,K,N,path,bf", [(*g, bf) for g in GEMM_SHAPES for bf in (True, False) if bf or g[3] != 1])
def test_gemm(rng, M, K, N, path, bf):
    x, w = randn(rng, M, K), randn(rng, N, K, scale=K ** -0.5)
    if bf:
        x, w = bf16_round(x), bf16_round(w)
    got = _cuda.k_gemm(x, w, bf, path)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    err = np.abs(got - ref).max() / max(1e-3, np.abs(ref).max())
    assert err <= 1e-5, f"max relative error {err:.3g}"


@pytest.mark.parametrize("M,K,N,geglu,fused", [(*w, False, False) for w in WAVE_SHAPES] +
                         [(1, 1152, 6913, True, False), (1, 1152, 6913, True, True), (2, 2560, 4096, False, True),
                          (2, 1152, 5003, False, True), (1, 640, 1001, False, False), (1, 2560, 10240, True, False)])
def test_gemv_wave_rule(M, K, N, geglu, fused):
    """gemv_mode 2 (the default): where the old rule's grid is more than one and less than four waves of
    resident blocks, fewer warps per row make it one wave (each lane keeping a load); elsewhere the old rule
    stands; the fused kernel takes the plain one's warps per row. The products themselves are checked in
    test_gemm / test_gemm_geglu / test_gemv_residual."""
    assert _cuda.gemv_mode() == 2
    new = _cuda.gemv_shape(M, N, K, geglu, fused)
    _cuda.set_gemv_mode(1)
    try:
        old = _cuda.gemv_shape(M, N, K, geglu, fused)
    finally:
        _cuda.set_gemv_mode(2)
    wpr, blocks, resident = new
    assert resident > 0 and old[2] == resident
    plain = _cuda.gemv_shape(M, N, K, geglu, False)
    print(f"M={M} K={K} N={N} geglu={geglu} fused={fused}: old {old[:2]}, new {new[:2]}, resident {resident}")
    if (M, K, N) in WAVE_SHAPES:  # chosen to be over one wave at the old rule, so that the rule is exercised
        assert resident < old[1] < 4 * resident
    if fused:  # the plain kernel's warps per row, so its summation order and bits
        assert new[:2] == plain[:2]
        return
    if resident < old[1] < 4 * resident and -(-N // 8) <= resident:  # one wave reachable (8 rows a block)
        assert blocks <= resident and wpr < old[0]
    else:  # already one wave, or three and more
        assert new == old


# (M, K, N, geglu, post): N up to several row groups per block of the fused kernel (at most one wave of
# blocks), K up to 2560 (5 and 10 residual elements per thread)
GEMV_RESIDUAL_SHAPES = [(1, 640, 1001, False, True), (2, 1152, 5003, False, True), (1, 2560, 4099, False, False),
                        (2, 72, 37, False, True), (1, 1152, 2 * 6913, True, True), (2, 2560, 2 * 3001, True, False),
                        (1, 640, 2 * 2048, True, True)]


@pytest.mark.parametrize("M,K,N,geglu,post", GEMV_RESIDUAL_SHAPES)
def test_gemv_residual(rng, M, K, N, geglu, post):
    """The residual step fused ahead of the bf16 GEMV: the new residual and the product equal, bit for bit,
    residual_rmsnorm followed by the GEMV on its bf16 output (the same arithmetic); the residual step is
    checked against the CPU kernel as in test_residual_rmsnorm and the product against numpy in float64
    (1e-5 relative; GeGLU: one bf16 rounding)."""
    resid, delta = randn(rng, M, K, scale=5.0), randn(rng, M, K, scale=2.0)
    pw = randn(rng, K, scale=0.3) if post else None
    nw = randn(rng, K, scale=0.3)
    w = bf16_round(randn(rng, N, K, scale=(2 if geglu else 1) * K ** -0.5))
    out, r = _cuda.k_gemv_residual(resid, delta, pw, nw, w, 1e-6, geglu)
    r_sep, xn = _cuda.k_residual_rmsnorm(resid, delta, pw, nw, 1e-6, True)
    np.testing.assert_array_equal(r, r_sep)
    sep = _cuda.k_gemm_geglu(xn, w, True, 1) if geglu else _cuda.k_gemm(xn, w, True, 1)
    np.testing.assert_array_equal(out, sep)
    ref_r, ref_x = _core.residual_rmsnorm(resid, delta, pw, nw, 1e-6)
    assert_f32_close(r, ref_r)
    assert_bf16_close(xn, ref_x)
    prod = xn.astype(np.float64) @ w.astype(np.float64).T  # the product of the bf16 x the kernels used
    if geglu:
        ref = _core.geglu(prod.astype(np.float32))
        bad = np.abs(out - ref) > ULP * np.abs(ref) + 1e-5 * np.abs(ref).max()
        assert not bad.any(), np.abs(out - ref).max()
    else:
        err = np.abs(out - prod).max() / np.abs(prod).max()
        assert err <= 1e-5, f"max relative error {err:.3g}"


# (M, K, NH, KVH, D, residual step, QK-norm, local): the 270M / 1B / 4B shapes (one, one and four rounds
# of weight loads), 27B's head_dim 128 (clusters of 8), tiny heads (D 16: one block per head, no exchange;
# D 32 without QK-norm), a K whose loads do not fill the lanes' last round
QKV_ROPE_CASES = [(1, 640, 4, 1, 256, True, True, False), (2, 1152, 4, 1, 256, True, True, True),
                  (1, 2560, 8, 4, 256, True, True, False), (2, 2560, 8, 4, 256, False, True, True),
                  (2, 1000, 8, 2, 128, True, True, True), (1, 1000, 8, 2, 128, False, True, False),
                  (2, 72, 6, 2, 16, True, True, True), (1, 136, 4, 2, 32, False, False, False)]


def rope_f64(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE in float64 with the kernels' angles: pos * inv_freq in float32, cos / sin in double."""
    ang = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)[:, None, :]
    c, s = np.cos(ang), np.sin(ang)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@pytest.mark.parametrize("M,K,NH,KVH,D,res,qknorm,local", QKV_ROPE_CASES)
def test_gemv_qkv_rope(rng, M, K, NH, KVH, D, res, qknorm, local):
    """The qkv product with QK-norm, RoPE and the cache write in one kernel (a cluster per head) against
    float64 numpy on the same bf16 x: q, k, v within one bf16 ulp (+1e-6) of the reference; the new key and
    value in cache slot pos % cap bit for bit as returned, every other slot untouched; with the residual
    step, the new residual equal bit for bit to residual_rmsnorm's (the same arithmetic as gemv_residual)."""
    if not _cuda.gemv_qkv_rope_supported(M, K, D):
        pytest.skip("gemv_qkv_rope needs sm_90 thread-block clusters")
    eps, theta, factor = 1e-6, 1e6, 8.0
    cap = 37 if local else 4099
    pos = rng.integers(0, 4000, M).astype(np.int32)
    if local:
        pos[0] = 3 * cap + 5  # a ring slot after wrapping
    w = bf16_round(randn(rng, (NH + 2 * KVH) * D, K, scale=K ** -0.5))
    qw = randn(rng, D, scale=0.3) if qknorm else None
    kw = randn(rng, D, scale=0.3) if qknorm else None
    kc0, vc0 = bf16_round(randn(rng, M, KVH, cap, D)), bf16_round(randn(rng, M, KVH, cap, D))
    if res:
        resid, delta = randn(rng, M, K, scale=5.0), randn(rng, M, K, scale=2.0)
        pw, nw = randn(rng, K, scale=0.3), randn(rng, K, scale=0.3)
        r_sep, x = _cuda.k_residual_rmsnorm(resid, delta, pw, nw, eps, True)
        dummy = np.zeros((M, K), np.float32)  # not read
        q, k, v, kc, vc, r = _cuda.k_gemv_qkv_rope(dummy, resid, delta, pw, nw, w, NH, KVH, D, qw, kw, theta, factor,
                                                   pos, local, kc0, vc0, eps)
        np.testing.assert_array_equal(r, r_sep)
    else:
        x = bf16_round(randn(rng, M, K))
        q, k, v, kc, vc, r = _cuda.k_gemv_qkv_rope(x, None, None, None, None, w, NH, KVH, D, qw, kw, theta, factor,
                                                   pos, local, kc0, vc0, eps)
        assert r is None
    prod = x.astype(np.float64) @ w.astype(np.float64).T
    rq = prod[:, :NH * D].reshape(M, NH, D)
    rk = prod[:, NH * D:(NH + KVH) * D].reshape(M, KVH, D)
    rv = prod[:, (NH + KVH) * D:].reshape(M, KVH, D)
    if qknorm:
        rq = rq / np.sqrt((rq * rq).mean(-1, keepdims=True) + eps) * (1.0 + qw.astype(np.float64))
        rk = rk / np.sqrt((rk * rk).mean(-1, keepdims=True) + eps) * (1.0 + kw.astype(np.float64))
    inv = _core.rope_inv_freq(D, theta, factor)  # the kernel's own float32 frequencies (numpy's powf differs by an ulp)
    rq, rk = rope_f64(rq, pos, inv), rope_f64(rk, pos, inv)
    assert_bf16_close(q, rq)
    assert_bf16_close(k, rk)
    assert_bf16_close(v, rv)
    for m in range(M):
        slot = pos[m] % cap
        for cache, new, before in ((kc, k, kc0), (vc, v, vc0)):
            np.testing.assert_array_equal(cache[m, :, slot], new[m])
            keep = np.ones(cap, bool)
            keep[slot] = False
            np.testing.assert_array_equal(cache[m][:, keep], before[m][:, keep])


GEGLU_SHAPES = [(1, 640, 2048, 0), (2, 72, 49, 0), (3, 72, 49, 1), (8, 1152, 333, 1), (8, 1152, 333, 0),
                (13, 136, 100, 0), (2, 2560, 77, 2), (1, 1152, 6913, 0)]  # the last: 1B's gate_up (wave rule)


@pytest.mark.parametrize("M,K,F,path,bf", [(*g, bf) for g in GEGLU_SHAPES for bf in (True, False) if bf or g[3] != 1])
def test_gemm_geglu(rng, M, K, F, path, bf):
    """The GeGLU fused into the stacked gate_up product (GEMV for bf16 M <= 2, or forced up to 8; else
    the product and the geglu kernel)."""
    x, w = randn(rng, M, K), randn(rng, 2 * F, K, scale=2 * K ** -0.5)
    if bf:
        x, w = bf16_round(x), bf16_round(w)
    got = _cuda.k_gemm_geglu(x, w, bf, path)
    gu = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    ref = _core.geglu(gu)
    if bf:
        # one bf16 rounding of the result; the float32 sums differ in order by ~1e-6 relative
        bad = np.abs(got - ref) > ULP * np.abs(ref) + 1e-5 * np.abs(ref).max()
        assert not bad.any(), np.abs(got - ref).max()
    else:
        assert_f32_close(got, ref, 1e-5)


def test_softcap(rng):
    x = randn(rng, 5, 777, scale=40.0)
    assert_f32_close(_cuda.k_softcap(x, 30.0), _core.softcap(x, 30.0), 1e-6)


@pytest.mark.parametrize("many_block", [True, False])
def test_argmax_first_maximum(rng, many_block):
    V = 262144
    logits = randn(rng, 4, V)
    logits[0, [5, 70000, 262143]] = 50.0     # ties: the first wins
    logits[1, [262143]] = 60.0
    logits[2, [0, 1]] = 70.0
    logits[3] = -3.0                         # all equal
    zeros = np.zeros(4, np.float32)
    got = _cuda.k_sample(logits, zeros, np.zeros(4, np.int32), np.ones(4, np.float32), np.zeros(4, np.uint64),
                         np.zeros(4, np.uint64), many_block)
    assert got.tolist() == [5, 262143, 0, 0]
    assert got.tolist() == _core.argmax(logits)


@pytest.mark.parametrize("V", [3001, 262144])
def test_sampling_matches_cpu(rng, V):
    rows = []
    for temp in (0.0, 0.7, 1.3):
        for k in (1, 7, 64, 1024):
            for p in (1.0, 0.9, 0.3):
                rows.append((temp, k, p))
    B = len(rows)
    logits = randn(rng, B, V, scale=3.0)
    logits[::2] = np.round(logits[::2] * 4) / 4  # many exact ties, also at the top-k boundary
    temp = np.array([r[0] for r in rows], np.float32)
    top_k = np.array([r[1] for r in rows], np.int32)
    top_p = np.array([r[2] for r in rows], np.float32)
    seed = rng.integers(0, 2**63, B).astype(np.uint64)
    counter = rng.integers(0, 1000, B).astype(np.uint64)
    got = _cuda.k_sample(logits, temp, top_k, top_p, seed, counter)
    ref = _core.sample(logits, temp.tolist(), top_k.tolist(), top_p.tolist(), seed.tolist(), counter.tolist())
    assert got.tolist() == list(ref)


# Wide rows (top_k 0 or > SAMPLE_MAX_K: the whole vocabulary): tests/test_cuda_sampling.py
