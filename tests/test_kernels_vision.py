"""The vision encoder's CPU kernels against numpy in float64, on fresh random inputs of odd sizes
(and SigLIP's head_dim 72). Tolerance: relative 2e-5 (float32 arithmetic against float64); products
over long sums get the same allowance as tests/test_kernels_cpu.py's matmul."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gemma3_native import _native as core
from gemma3_native.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

from test_kernels_cpu import RTOL, rel_err, rmsnorm_ref


def gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("rows,dim", [(1, 7), (13, 129), (3, 1152)])
def test_layernorm(rng, rows, dim):
    x = (rng.standard_normal((rows, dim)) * 3 + 1.5).astype(np.float32)  # an offset mean: the centring matters
    w = rng.standard_normal(dim).astype(np.float32)
    b = rng.standard_normal(dim).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * w + b
    assert rel_err(core.layernorm(x, w, b, 1e-6), ref) < RTOL


def test_bias_kernels(rng):
    rows, cols = 9, 77
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    d = rng.standard_normal((rows, cols)).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    x64, d64, b64 = x.astype(np.float64), d.astype(np.float64), b.astype(np.float64)
    assert rel_err(core.bias_add(x, b), x64 + b64) < RTOL
    assert rel_err(core.bias_gelu_tanh(x, b), gelu_tanh_ref(x64 + b64)) < RTOL
    assert rel_err(core.bias_residual_add(x, d, b), x64 + d64 + b64) < RTOL


def test_unfold_patches_is_conv_layout(rng):
    C, H, W, p = 3, 42, 28, 14
    img = rng.standard_normal((C, H, W)).astype(np.float32)
    got = core.unfold_patches(img, p)
    ref = img.reshape(C, H // p, p, W // p, p).transpose(1, 3, 0, 2, 4).reshape((H // p) * (W // p), C * p * p)
    assert np.array_equal(got, ref)


def conv_ref(img, w, b):
    """stride = kernel convolution in float64, straight from the definition."""
    C, S, _ = img.shape
    hidden, _, p, _ = w.shape
    g = S // p
    out = np.zeros((g * g, hidden))
    for py in range(g):
        for px in range(g):
            patch = img[:, py * p:(py + 1) * p, px * p:(px + 1) * p].astype(np.float64)
            out[py * g + px] = np.tensordot(w.astype(np.float64), patch, axes=([1, 2, 3], [0, 1, 2])) + b
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_patch_embed(rng, dtype):
    C, S, p, hidden = 3, 42, 14, 37
    img = rng.uniform(-1, 1, (C, S, S)).astype(np.float32)
    w32 = (rng.standard_normal((hidden, C, p, p)) / math.sqrt(C * p * p)).astype(np.float32)
    w = w32.reshape(hidden, -1) if dtype == "float32" else f32_to_bf16_bits(w32.reshape(hidden, -1))
    wref = w32 if dtype == "float32" else bf16_bits_to_f32(w).reshape(w32.shape)
    b = rng.standard_normal(hidden).astype(np.float32)
    pos = rng.standard_normal(((S // p) ** 2, hidden)).astype(np.float32)
    got = core.patch_embed(img, np.ascontiguousarray(w), b, pos, p)
    assert rel_err(got, conv_ref(img, wref, b) + pos) < 1e-5 * math.sqrt(C * p * p / 64 + 1)


def attention_full_ref(q, k, v, scale):
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("ihd,jhd->hij", q, k) * scale
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", s, v)


@pytest.mark.parametrize("n,heads,head_dim", [(1, 2, 13), (37, 3, 72), (301, 2, 72), (16, 16, 72)])
def test_attention_full(rng, n, heads, head_dim):
    """Non-causal: every query sees every key (n = 301 spans three 128-query blocks and a 16-key panel tail)."""
    q = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
    scale = head_dim ** -0.5
    assert rel_err(core.attention_full(q, k, v, scale), attention_full_ref(q, k, v, scale)) < RTOL


@pytest.mark.parametrize("grid,k,dim", [(6, 3, 5), (8, 4, 33), (4, 2, 1)])
def test_avg_pool(rng, grid, k, dim):
    x = rng.standard_normal((grid * grid, dim)).astype(np.float32)
    t = grid // k
    ref = x.astype(np.float64).reshape(t, k, t, k, dim).mean(axis=(1, 3)).reshape(t * t, dim)
    assert rel_err(core.avg_pool(x, grid, k), ref) < RTOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mm_projector(rng, dtype):
    grid, k, Hv, Ht = 8, 4, 45, 29
    x = rng.standard_normal((grid * grid, Hv)).astype(np.float32)
    nw = rng.standard_normal(Hv).astype(np.float32)
    w32 = (rng.standard_normal((Ht, Hv)) / math.sqrt(Hv)).astype(np.float32)
    w = w32 if dtype == "float32" else f32_to_bf16_bits(w32)
    wref = (w32 if dtype == "float32" else bf16_bits_to_f32(w)).astype(np.float64)
    t = grid // k
    pooled = x.astype(np.float64).reshape(t, k, t, k, Hv).mean(axis=(1, 3)).reshape(t * t, Hv)
    ref = rmsnorm_ref(pooled, nw, 1e-6) @ wref.T
    assert rel_err(core.mm_projector(x, grid, k, nw, 1e-6, w), ref) < RTOL
