"""The CUDA vision encoder: each kernel against numpy in float64 (or the CPU kernel) on random odd sizes,
and the whole SigLIP tower + projector against transformers on random tiny configs.

Tolerances (inputs rounded to bf16 as the kernels take them, references in float64 on those values):
- float32 outputs of products (patch embedding, projection): max |diff| <= 1e-5 x max(1, max |ref|)
  (bf16 x bf16 products are exact in float32; only the summation order differs);
- float32 LayerNorm: max |diff| <= 2e-6 x max(1, max |ref|); the fused residual add: bitwise (on a bf16
  residual stream: the float32 sum rounded to nearest bf16, bitwise);
- bf16 outputs: at most one bf16 ulp (2^-7 relative) + 1e-6 from the reference rounded to bf16;
- the q/k/v split and scatter_rows: bitwise;
- the vectorized LayerNorm / q/k/v split / bias + gelu kernels vs their scalar fallbacks: bitwise;
- attention (probabilities rounded to bf16 before P.V, as flash kernels do): ||out - ref|| / ||ref||
  <= 1e-2 overall and <= 3e-2 for every query row (a wrong row or tail is far outside that);
- the tower in bf16 vs transformers' float32 on the same bf16-rounded weights: relative (Frobenius)
  error <= 2e-2, and at most 2x transformers' own bf16 error (+ 2e-3)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import gemma3_native as g3
from gemma3_native import _core

from conftest import make_hf_mm_model, save_checkpoint
from test_cuda_kernels import ULP, assert_bf16_close, bf16_round

try:
    from gemma3_native import _cuda
    HAVE_GPU = _cuda.device_count() > 0
except ImportError:
    _cuda = None
    HAVE_GPU = False

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a GPU")]


def rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def assert_f32_close(got, ref, rtol):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(got, np.float64) - ref).max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} x {scale:.3g}"


def gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- kernels ----

@pytest.mark.parametrize("n,S,hidden", [(1, 42, 37), (3, 56, 64), (2, 224, 48)])
@pytest.mark.parametrize("bf16_resid", [False, True])
def test_patch_embed(rng, n, S, hidden, bf16_resid):
    C, p = 3, 14
    img = rng.uniform(-1, 1, (n, C, S, S)).astype(np.float32)
    w = randn(rng, hidden, C * p * p, scale=1 / math.sqrt(C * p * p))
    b, pos = randn(rng, hidden), randn(rng, (S // p) ** 2, hidden)
    got = _cuda.k_vision_patch_embed(img, w, b, pos, p, bf16_resid=bf16_resid)
    g = S // p
    # the conv as a product over unfolded patches, in float64 on the bf16-rounded pixels and weights
    patches = bf16_round(img).astype(np.float64).reshape(n, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    ref = patches.reshape(n * g * g, C * p * p) @ bf16_round(w).astype(np.float64).T + b + np.tile(pos, (n, 1))
    assert got.shape == ref.shape
    if bf16_resid:  # the float32 sum rounded once: one bf16 ulp of the reference
        assert_bf16_close(got, ref)
        return
    assert_f32_close(got, ref, 1e-5)
    # the unfold order is the conv weight's: the CPU kernel (float32, same weights) agrees
    cpu = _core.patch_embed(bf16_round(img[0]), bf16_round(w), b, pos, p)
    assert_f32_close(got[:g * g], cpu.astype(np.float64), 1e-5)


# dim % 4 == 0: the vectorized kernel (12288: one warp a block, 48 KB of shared memory); else the scalar one
@pytest.mark.parametrize("rows,dim", [(1, 7), (13, 129), (37, 1152), (5, 36), (9, 1156), (3, 12288)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bf16_out", [False, True])
@pytest.mark.parametrize("bf16_resid", [False, True])
def test_layernorm(rng, rows, dim, fused, bf16_out, bf16_resid):
    x = randn(rng, rows, dim, scale=3.0) + 1.5  # an offset mean: the centring matters
    if bf16_resid:
        x = bf16_round(x)  # the bf16 residual stream holds these values
    w, b = randn(rng, dim), randn(rng, dim)
    kw = {}
    x_after = x
    if fused:
        delta, dbias = randn(rng, rows, dim), randn(rng, dim, scale=0.3)
        kw = dict(delta=delta, dbias=dbias)
        x_after = x + (bf16_round(delta) + dbias)  # float32, the kernel's order
        if bf16_resid:
            x_after = bf16_round(x_after)  # rounded once; the norm reads the rounded value
    got_x, got = _cuda.k_vision_layernorm(x, w, b, 1e-6, bf16_out=bf16_out, bf16_resid=bf16_resid, **kw)
    np.testing.assert_array_equal(got_x, x_after)
    x64 = x_after.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * w + b
    if bf16_out:
        assert_bf16_close(got, ref)
    else:
        assert_f32_close(got, ref, 2e-6)
    # the CPU kernel (double statistics) agrees
    assert_f32_close(_core.layernorm(x_after, w, b, 1e-6), ref, 2e-6)


# D % 8 == 0: the vectorized kernel (row groups of 8 crossing images; 1, 2 or 9 padding chunks); else scalar
@pytest.mark.parametrize("n_img,N,heads,D", [(1, 5, 3, 12), (2, 37, 2, 72), (3, 16, 1, 80), (3, 13, 3, 64),
                                             (2, 11, 2, 8), (1, 3, 16, 72), (3, 9, 2, 12)])
def test_qkv_bias_split(rng, n_img, N, heads, D):
    qkv = randn(rng, n_img * N, 3 * heads * D)
    bias = randn(rng, 3 * heads * D)
    got = _cuda.k_vision_qkv_bias_split(qkv, bias, n_img, heads)
    ref = np.zeros((3, heads, n_img, N, 80), np.float32)  # qh [3][heads][img][N][80]
    summed = bf16_round(bf16_round(qkv) + bias).reshape(n_img, N, 3, heads, D)
    ref[..., :D] = summed.transpose(2, 3, 0, 1, 4)
    np.testing.assert_array_equal(got, ref)  # the padding included: it must be zeros


@pytest.mark.parametrize("rows,cols", [(1, 1), (13, 4304), (7, 77), (9, 8), (33, 1152)])
def test_bias_gelu(rng, rows, cols):
    h = randn(rng, rows, cols, scale=3.0)
    b = randn(rng, cols)
    got = _cuda.k_vision_bias_gelu(h, b)
    ref = gelu_tanh_ref((bf16_round(h) + b).astype(np.float64))  # the sum in float32, as the kernel does
    assert_bf16_close(got, ref)


@pytest.mark.parametrize("kernel", ["layernorm", "layernorm_f32", "layernorm_bf16_resid", "layernorm_f32_bf16_resid",
                                    "qkv_bias_split", "bias_gelu"])
def test_vector_paths_match_scalar(rng, kernel):
    """The vectorized elementwise kernels do the scalar kernels' float32 arithmetic per element (and sum the
    LayerNorm statistics in their order): bitwise-identical outputs, on SigLIP's row lengths."""
    if kernel.startswith("layernorm"):
        x, w, b = randn(rng, 21, 1152, scale=3.0) + 1.5, randn(rng, 1152), randn(rng, 1152)
        delta, dbias = randn(rng, 21, 1152), randn(rng, 1152, scale=0.3)
        kw = dict(bf16_out="f32" not in kernel, bf16_resid="bf16_resid" in kernel)
        run = lambda: (_cuda.k_vision_layernorm(x, w, b, 1e-6, delta=delta, dbias=dbias, **kw)
                       + _cuda.k_vision_layernorm(x, w, b, 1e-6, **kw))
    elif kernel == "qkv_bias_split":
        qkv, bias = randn(rng, 2 * 45, 3 * 3 * 72, scale=2.0), randn(rng, 3 * 3 * 72)
        run = lambda: (_cuda.k_vision_qkv_bias_split(qkv, bias, 2, 3),)
    else:
        h, bias = randn(rng, 19, 4304, scale=3.0), randn(rng, 4304)
        run = lambda: (_cuda.k_vision_bias_gelu(h, bias),)
    vec = run()
    _cuda.k_vision_force_scalar(True)
    try:
        scalar = run()
    finally:
        _cuda.k_vision_force_scalar(False)
    for a, s in zip(vec, scalar):
        np.testing.assert_array_equal(a, s)


def attention_f64(q, k, v, scale):
    """q, k, v [n_img, N, heads, D] as given -> float64 softmax(q k^T * scale) v per image and head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", s, v)


def attention_ref(q, k, v, scale):
    """attention_f64 on the inputs rounded to bf16, as the kernels take them."""
    return attention_f64(*(bf16_round(a) for a in (q, k, v)), scale)


def attention_kernels() -> list[str]:
    """The attention kernels this GPU runs: mma.sync everywhere, wgmma on compute capability 9.0."""
    return ["mma", "wgmma"] if _cuda.vision_wgmma_available() else ["mma"]


def test_wgmma_kernel_available_on_hopper():
    """The build this suite runs on (sm_90a in the default architectures) must give the H100 / H200 the
    wgmma attention kernel, so that its tests below cannot be skipped there without notice."""
    if not _cuda.device_count():
        pytest.skip("no CUDA device")
    name = _cuda.device_name(0)
    if "H100" in name or "H200" in name or "GH200" in name:
        assert _cuda.vision_wgmma_available(), f"{name}: the wgmma vision attention is not available"


@pytest.mark.parametrize("kernel", ["mma", "wgmma", "wgmma+pingpong"])
@pytest.mark.parametrize("n_img,N,heads,D", [
    (1, 1, 2, 72),      # one key: a tail tile holding a single valid row
    (2, 37, 3, 72),     # SigLIP's head dim, one partial tile
    (1, 301, 2, 72),    # three query blocks of 128, five key tiles with a tail
    (2, 130, 4, 12),    # the tiny test config's head dim (n-tiles rounded up to 2)
    (1, 77, 2, 80),     # the padded width itself
    (1, 64, 1, 64),
    (1, 1030, 2, 72),   # many tiles; long softmax sums
    (3, 129, 5, 72),    # one key past a whole tile
    (1, 257, 3, 6),     # a single n-tile of output dims
    (2, 383, 1, 40),    # odd n-tile count (5), a tile one key short
    (1, 4096, 1, 72),   # SigLIP's 896-pixel shape (one head)
])
def test_attention(rng, kernel, n_img, N, heads, D):
    name, *opts = kernel.split("+")
    if name not in attention_kernels():
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU")
    q, k, v = (randn(rng, n_img, N, heads, D, scale=1.5) for _ in range(3))
    scale = D ** -0.5
    was = _cuda.k_vision_wgmma_pingpong("pingpong" in opts) if name == "wgmma" else None
    try:
        got = _cuda.k_vision_attention(q, k, v, scale, name)
    finally:
        if was is not None:
            _cuda.k_vision_wgmma_pingpong(was)
    ref = attention_ref(q, k, v, scale)
    assert got.shape == ref.shape
    err = rel(got, ref)
    rows = np.linalg.norm((got - ref).reshape(-1, D), axis=1) / np.linalg.norm(ref.reshape(-1, D), axis=1)
    print(f"N={N} D={D}: rel err {err:.2e}, worst row {rows.max():.2e}")
    assert err <= 1e-2
    assert rows.max() <= 3e-2


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("n_img,N,heads,D", [
    (1, 8, 2, 72),      # one partial tile: the second box of 64 keys wholly outside the image
    (2, 40, 3, 72),     # images side by side in the key dimension of the tensor map
    (1, 296, 2, 72),    # three query blocks of 128, a tail tile of 40 keys
    (2, 136, 4, 12),    # the tiny test config's head dim (n-tiles rounded up to 2)
    (1, 80, 2, 80),     # the padded width itself
    (1, 64, 1, 64),
    (1, 1032, 2, 72),   # many tiles; long softmax sums
    (3, 128, 5, 72),    # whole tiles only
    (1, 256, 3, 6),     # a single n-tile of output dims
    (2, 384, 1, 40),    # odd n-tile count (5)
    (1, 4096, 1, 72),   # SigLIP's 896-pixel shape (one head)
])
def test_attention_transposed(rng, pingpong, n_img, N, heads, D):
    """The wgmma kernel on the transposed q/k/v product (no split pass), with q's and v's biases added inside
    it, against float64 softmax((q + b_q)(k + b_k)^T * scale)(v + b_v): b_k, which the kernel never sees, is
    large, so the check also shows that the softmax cancels it. q + b_q is rounded to bf16 as the kernel does;
    k and v are not rounded after their biases. Same bounds as test_attention."""
    if "wgmma" not in attention_kernels():
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU")
    q, k, v = (randn(rng, n_img, N, heads, D, scale=1.5) for _ in range(3))
    bq, bk, bv = randn(rng, heads * D), randn(rng, heads * D, scale=3.0), randn(rng, heads * D)
    scale = D ** -0.5
    was = _cuda.k_vision_wgmma_pingpong(pingpong)
    try:
        got = _cuda.k_vision_attention_t(q, k, v, bq, bv, scale)
    finally:
        _cuda.k_vision_wgmma_pingpong(was)
    shape = (1, 1, heads, D)
    q64 = bf16_round(bf16_round(q) + bq.reshape(shape)).astype(np.float64)
    k64 = bf16_round(k).astype(np.float64) + bk.reshape(shape)
    v64 = bf16_round(v).astype(np.float64) + bv.reshape(shape)
    ref = attention_f64(q64, k64, v64, scale)
    err = rel(got, ref)
    rows = np.linalg.norm((got - ref).reshape(-1, D), axis=1) / np.linalg.norm(ref.reshape(-1, D), axis=1)
    print(f"N={N} D={D}: rel err {err:.2e}, worst row {rows.max():.2e}")
    assert err <= 1e-2
    assert rows.max() <= 3e-2


def test_attention_transposed_errors(rng):
    if "wgmma" not in attention_kernels():
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU")
    q = randn(rng, 1, 12, 2, 72)
    b = randn(rng, 144)
    with pytest.raises(ValueError, match="multiple of 8"):
        _cuda.k_vision_attention_t(q, q, q, b, b, 0.1)
    q = randn(rng, 1, 16, 2, 72)
    with pytest.raises(ValueError, match="q_bias"):
        _cuda.k_vision_attention_t(q, q, q, b[:100], b, 0.1)


@pytest.mark.parametrize("n_img,grid,k,H", [(1, 4, 2, 48), (2, 8, 4, 45), (3, 6, 3, 1152)])
def test_pool_rmsnorm(rng, n_img, grid, k, H):
    y = randn(rng, n_img * grid * grid, H)
    w = randn(rng, H, scale=0.3)
    got = _cuda.k_vision_pool_rmsnorm(y, w, n_img, grid, k, 1e-6)
    t = grid // k
    pooled = y.astype(np.float64).reshape(n_img, t, k, t, k, H).mean(axis=(2, 4)).reshape(n_img * t * t, H)
    ref = pooled / np.sqrt((pooled ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    assert_bf16_close(got, ref)


@pytest.mark.parametrize("bf16_out", [False, True])
def test_vision_gemm(rng, bf16_out):
    x, w = randn(rng, 37, 129), randn(rng, 53, 129, scale=0.1)
    got = _cuda.k_vision_gemm(x, w, bf16_out)
    ref = bf16_round(x).astype(np.float64) @ bf16_round(w).astype(np.float64).T
    if bf16_out:
        assert_bf16_close(got, ref)
    else:
        assert_f32_close(got, ref, 1e-5)


@pytest.mark.parametrize("epilogue,autotune", [("bias", False), ("gelu_bias", False), ("none", False),
                                               ("gelu_bias", True), ("none", True)])
@pytest.mark.parametrize("bf16_out", [False, True])
def test_vision_gemm_epilogue(rng, epilogue, autotune, bf16_out):
    """cuBLASLt with the bias (and gelu) in the epilogue. In float32 the bound (1e-5 of the largest value)
    is far below the gap between gelu's tanh form (SigLIP's) and its erf form (up to 4.7e-4), so this
    also checks which gelu cuBLASLt computes. In bf16 the bound is what rounding the product to bf16 before
    the bias (as the cuBLAS + vision_bias_gelu path does) and rounding the result allow: half an ulp of
    |x.w| (times gelu's slope, at most 1.13) plus half an ulp of the result, here doubled. "none": the product
    alone; autotune: the algorithm the fastest of cuBLASLt's best 8, the same bounds."""
    x, w, b = randn(rng, 37, 129), randn(rng, 53, 129, scale=0.15), randn(rng, 53)
    got = _cuda.k_vision_gemm_epilogue(x, w, b, epilogue, bf16_out, autotune)
    bias = bf16_round(b) if bf16_out else b  # cuBLASLt takes the bias in the output's type
    if epilogue == "none":
        bias = 0.0
    pre = bf16_round(x).astype(np.float64) @ bf16_round(w).astype(np.float64).T + bias
    ref = gelu_tanh_ref(pre) if epilogue == "gelu_bias" else pre
    if epilogue == "gelu_bias":
        erf_form = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))
        assert np.abs(erf_form - ref).max() > 3 * 1e-5 * max(1.0, np.abs(ref).max())  # the check can tell them apart
    if bf16_out:
        prod = bf16_round(x).astype(np.float64) @ bf16_round(w).astype(np.float64).T
        slope = 1.13 if epilogue == "gelu_bias" else 1.0
        bound = ULP * (slope * np.abs(prod) + np.abs(ref)) + 1e-6
        worst = float((np.abs(got - ref) / bound).max())
        print(f"bf16 {epilogue}: worst error / bound {worst:.2f}")
        assert worst <= 1.0
    else:
        assert_f32_close(got, ref, 1e-5)


@pytest.mark.parametrize("autotune", [False, True])
@pytest.mark.parametrize("M,K,N", [(37, 129, 53), (300, 72, 144), (512, 1152, 216)])
def test_vision_gemm_transposed(rng, autotune, M, K, N):
    """The product written transposed ([N, M], bf16): within half a bf16 ulp of float64's, doubled, plus what
    float32 accumulation over K terms may add where the sum cancels: 2^-24 sqrt(K) x sum |x_k w_k| (at K = 1152
    up to ~4e-5; rounding a partial sum to bf16, or a wrong layout, would be 1e-3 or more)."""
    x, w = randn(rng, M, K), randn(rng, N, K, scale=K ** -0.5)
    got = _cuda.k_vision_gemm_t(x, w, autotune)
    x64, w64 = bf16_round(x).astype(np.float64), bf16_round(w).astype(np.float64)
    ref = (x64 @ w64.T).T
    acc = (2.0 ** -24 * math.sqrt(K) * (np.abs(x64) @ np.abs(w64).T)).T
    assert got.shape == (N, M)
    worst = float((np.abs(got - ref) / (ULP * np.abs(ref) + acc + 1e-7)).max())
    print(f"worst error / bound {worst:.2f}")
    assert worst <= 1.0


@pytest.mark.parametrize("M,K,N", [(37, 129, 53), (300, 72, 144), (5, 4304, 24)])
@pytest.mark.parametrize("bf16_resid", [False, True])
def test_vision_gemm_residual(rng, M, K, N, bf16_resid):
    """x += a.w^T + bias in float32 in cuBLASLt's epilogue: within 1e-5 of the largest value of float64's.
    On a bf16 residual stream (x and bias in bf16) the output is bf16, and cuBLASLt rounds to it once or twice
    depending on the algorithm it picks (measured on an H100: bf16(x + bf16(a.w + b)), transformers' own order,
    at SigLIP's shape; bf16(bf16(x + a.w) + b) at M=37 K=129 N=53; one rounding at M=5 K=4304), so the bound is
    one bf16 ulp of the result plus one of the larger intermediate sum, plus the float32 summation's bound
    (2^-24 sqrt(K) sum |a_k w_k|, as test_vision_gemm_transposed). A missing bias or residual, or a wrong
    layout, is orders of magnitude outside it."""
    x, a, w, b = randn(rng, M, N, scale=3.0), randn(rng, M, K), randn(rng, N, K, scale=K ** -0.5), randn(rng, N)
    if bf16_resid:
        x, b = bf16_round(x), bf16_round(b)
    got = _cuda.k_vision_gemm_residual(x, a, w, b, bf16_resid=bf16_resid)
    a64, w64 = bf16_round(a).astype(np.float64), bf16_round(w).astype(np.float64)
    ab = a64 @ w64.T
    ref = x + ab + b
    if not bf16_resid:
        assert_f32_close(got, ref, 1e-5)
        return
    assert np.array_equal(got, bf16_round(got)), "not a bf16 value"
    acc = 2.0 ** -24 * math.sqrt(K) * (np.abs(a64) @ np.abs(w64).T)
    inter = np.maximum(np.abs(ab + b), np.abs(x + ab))
    err = np.abs(got - ref)
    bound = ULP * (np.abs(ref) + inter) + acc + 1e-6
    assert (err <= bound).all(), f"{(err > bound).sum()} of {err.size} beyond the bound; worst {(err / bound).max():.2f}"


def test_scatter_rows(rng):
    x, src = randn(rng, 11, 33), randn(rng, 4, 33)
    rows = np.array([7, 0, 10, 3], np.int32)
    ref = x.copy()
    ref[rows] = src
    np.testing.assert_array_equal(_cuda.k_scatter_rows(x, src, rows), ref)


@pytest.mark.parametrize("path,D,NH,KVH", [("tc", 128, 4, 2), ("tc", 256, 2, 1), ("generic", 16, 6, 2)])
@pytest.mark.parametrize("window", [0, 32])
def test_prefill_attention_with_image_blocks(rng, path, D, NH, KVH, window):
    """Bidirectional image blocks in the prefill attention (both kernels) against the CPU kernel: a chunk
    of 150 queries after 20 cached positions, blocks straddling the 64-query tiles and key tiles, one
    longer than the window (its first tokens see past the window's right edge)."""
    start, n = 20, 150
    cap = 32 if window else start + n
    q, kn, vn = randn(rng, n, NH, D), randn(rng, n, KVH, D), randn(rng, n, KVH, D)
    kc, vc = randn(rng, KVH, cap, D), randn(rng, KVH, cap, D)
    q, kn, vn, kc, vc = (bf16_round(a) for a in (q, kn, vn, kc, vc))
    ext = np.arange(start, start + n, dtype=np.int32)
    for s, e in ((start + 10, start + 40), (start + 60, start + 131), (start + 149, start + 150)):
        ext[s - start:e - start] = e - 1
    scale = D ** -0.5
    got = _cuda.k_attention_extent(q, kn, vn, kc, vc, start, window, scale, ext, path)
    ref = _core.attention(q, kn, vn, kc.copy(), vc.copy(), start, window, scale, 0.0, False, ext)
    causal = _core.attention(q, kn, vn, kc.copy(), vc.copy(), start, window, scale, 0.0, False)
    rows = np.linalg.norm((got - ref).reshape(n, -1), axis=1) / np.linalg.norm(ref.reshape(n, -1), axis=1)
    print(f"{path} D={D} window={window}: rel err {rel(got, ref):.2e}, worst row {rows.max():.2e}")
    assert rel(got, ref) <= 1e-2 and rows.max() <= 3e-2
    assert rel(causal, ref) > 0.1  # the blocks change the answer


# ---- the tower and projector against transformers ----

VISION_CFG = dict(hidden_size=144, num_attention_heads=2, intermediate_size=100, num_hidden_layers=3,
                  image_size=224)  # head_dim 72 as SigLIP; 16 x 16 = 256 patches: two query blocks


@pytest.fixture(scope="module")
def tower_models(tmp_path_factory, tokenizer_model):
    hf = make_hf_mm_model(seed=1, vision_overrides=VISION_CFG, mm_tokens_per_image=16)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    d = save_checkpoint(copy.deepcopy(hf16), tmp_path_factory.mktemp("mm_bf16"), tokenizer_model)
    ours = g3.load(d, device="cuda")
    ref = copy.deepcopy(hf16).float()  # float32 arithmetic on the bf16-rounded weights
    return ours, ref, hf16


def test_cuda_encoder_is_chosen(tower_models):
    ours, _, _ = tower_models
    assert isinstance(ours.vision, _cuda.CudaVisionEncoder) and ours.vision.weight_dtype == "bfloat16"
    assert ours.vision.config.head_dim == 72 and ours.vision.config.num_patches == 256
    assert ours.vision.device_bytes > 0
    # on the H100 / H200 the attention reads the transposed q/k/v product (256 patches: a multiple of 8)
    assert ours.vision.qkv_transposed == _cuda.vision_wgmma_available()
    assert ours.vision.residual_bf16  # transformers' bf16 residual stream, on every device


EPILOGUE_PATHS = ("fc1_epilogue", "residual_epilogue", "lt_autotune", "qkv_transposed", "residual_bf16",
                  "o_residual_epilogue")


@pytest.mark.parametrize("paths", ["default", "none", "fc1_epilogue", "residual_epilogue", "lt_autotune",
                                   "qkv_transposed", "residual_bf16", "o_residual_epilogue",
                                   "residual_bf16+residual_epilogue+o_residual_epilogue"])
def test_tower_and_features_vs_transformers(tower_models, paths):
    """The encoder with its default paths, with none of its optional paths (the three epilogues, timed
    algorithms, the transposed q/k/v product, the bf16 residual stream), with each one alone, and with the
    bf16 residual stream under both residual epilogues, within the same bounds."""
    ours, ref, hf16 = tower_models
    v = ours.vision
    on = set(paths.split("+"))
    if "qkv_transposed" in on and not _cuda.vision_wgmma_available():
        pytest.skip("the transposed q/k/v path needs the wgmma attention (compute capability 9.0)")
    was = {p: getattr(v, p) for p in EPILOGUE_PATHS}
    if paths != "default":
        for p in EPILOGUE_PATHS:
            setattr(v, p, p in on)
    try:
        check_tower(ours, ref, hf16)
    finally:
        for p, on in was.items():
            setattr(v, p, on)


def check_tower(ours, ref, hf16) -> None:
    px = np.random.default_rng(2).uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        tower_ref = ref.model.vision_tower(pixel_values=torch.from_numpy(px)).last_hidden_state.double().numpy()
        feat_ref = ref.model.get_image_features(torch.from_numpy(px)).pooler_output.double().numpy()
        g16 = hf16.to("cuda")
        pxc = torch.from_numpy(px).to("cuda", torch.bfloat16)
        tower_16 = g16.model.vision_tower(pixel_values=pxc).last_hidden_state.double().cpu().numpy()
        feat_16 = g16.model.get_image_features(pxc).pooler_output.double().cpu().numpy()
        hf16.to("cpu")
    tower, feat = ours.vision.encode(px), ours.vision.forward(px)
    assert tower.shape == tower_ref.shape and feat.shape == feat_ref.reshape(feat.shape).shape
    feat_ref, feat_16 = feat_ref.reshape(feat.shape), feat_16.reshape(feat.shape)
    print(f"tower: ours {rel(tower, tower_ref):.2e}, transformers bf16 {rel(tower_16, tower_ref):.2e}; "
          f"features: ours {rel(feat, feat_ref):.2e}, transformers bf16 {rel(feat_16, feat_ref):.2e}")
    assert rel(tower, tower_ref) <= 2e-2 and rel(tower, tower_ref) <= 2 * rel(tower_16, tower_ref) + 2e-3
    assert rel(feat, feat_ref) <= 2e-2 and rel(feat, feat_ref) <= 2 * rel(feat_16, feat_ref) + 2e-3


def test_more_images_than_the_buffers_hold(tower_models):
    """5 images run as chunks of max_images (4): each equals the image alone (up to summation order)."""
    ours, _, _ = tower_models
    assert ours.vision.max_images < 5
    px = np.random.default_rng(3).uniform(-1, 1, (5, 3, 224, 224)).astype(np.float32)
    together = ours.vision.forward(px)
    for i in (0, 4):
        assert rel(together[i], ours.vision.forward(px[i:i + 1])[0]) <= 5e-3


def test_run_device_equals_forward(tower_models):
    ours, _, _ = tower_models
    px = np.random.default_rng(4).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    c = ours.vision.config
    dpx = torch.from_numpy(px).cuda()
    out = torch.empty((2, c.mm_tokens_per_image, c.text_hidden_size), dtype=torch.float32, device="cuda")
    ours.vision.run_device(dpx.data_ptr(), 2, out.data_ptr(), True)
    np.testing.assert_array_equal(out.cpu().numpy(), ours.vision.forward(px))


def test_errors(tower_models):
    ours, _, _ = tower_models
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours.vision.forward(np.zeros((1, 3, 56, 56), np.float32))
    with pytest.raises(ValueError, match="bfloat16"):
        _cuda.CudaVisionEncoder(ours.vision.config, "float32")
    with pytest.raises(ValueError, match="max_images"):
        _cuda.CudaVisionEncoder(ours.vision.config, "bfloat16", 0)
    fresh = _cuda.CudaVisionEncoder(ours.vision.config, "bfloat16", 1)
    with pytest.raises(ValueError, match="vision weights"):
        fresh.forward(np.zeros((1, 3, 224, 224), np.float32))
