"""GPU benchmark of the CUDA vision encoder: SigLIP So400m/14 at 896 px (Gemma 3's tower: hidden 1152,
27 layers, 16 heads of 72, intermediate 4304, 4096 patches) with random bf16 weights generated on the GPU,
against transformers' SiglipVisionModel (bf16, attn_implementation='sdpa', CUDA) on the same weights in
the same run. First checks that the outputs agree (both against transformers in float32 on the same
weights), then times images/s at batch 1 and 8 (median of --iters runs; pixels and outputs stay on the
GPU on both sides; every run ends with a device synchronize). Then the time to first token of a
4B-shaped Gemma 3 (random bf16 weights; hidden 2560, 34 layers, 8 heads, 4 kv heads, head_dim 256,
intermediate 10240, window 1024, 5:1 local:global) given one image and a short prompt: preprocessing
of a 1200x900 image, the vision tower + projector, the prefill with the image block, the first token.
Then where the time goes: our encoder per stage (CudaVisionEncoder.profile_stages: cudaEvents between the
stages, per-layer stages summed over the layers; ms, % of the total, TFLOP/s of the products and of
attention, GB/s of the elementwise stages) at each batch; attention alone on the tower's shapes (ours
through k_vision_attention_ptr against torch's scaled_dot_product_attention on [B, 16, 4096, 72] bf16 with
the backend it picks, and each fused backend forced); each product shape alone (ours through
k_vision_gemm_ptr, the encoder's cuBLAS call, against torch F.linear with bias as transformers runs it);
and transformers' own forward per CUDA kernel (torch.profiler), grouped into products / attention / other.
Prints markdown tables; writes $OUT/bench_vision.json.

    python3 bench/gpu/bench_vision.py [--out DIR] [--iters 20] [--layers 27] [--skip-ttft] [--skip-breakdown]
                                      [--attention-only]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gemma3_native import _core, _cuda
from gemma3_native.config import spec_from_dict

H, LAYERS, HEADS, INTER, IMAGE, PATCH, TEXT_H = 1152, 27, 16, 4304, 896, 14, 2560


def bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor as the uint16 numpy array set_weight takes."""
    return t.detach().contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def make_siglip(layers: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                             image_size=IMAGE, patch_size=PATCH, vision_use_head=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = SiglipVisionModel(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return hf


def make_ours(hf, layers: int, max_images: int):
    v = _core.VisionConfig()
    v.num_layers, v.text_hidden_size = layers, TEXT_H
    v.boi_token_id, v.eoi_token_id, v.image_token_id = 262000, 262001, 262002  # inside the bench vocabulary
    enc = _cuda.CudaVisionEncoder(v, "bfloat16", max_images)
    for name, p in hf.state_dict().items():
        if ".head." in f".{name}":  # no pooling head (vision_use_head=False); never in Gemma 3
            continue
        enc.set_weight(name.removeprefix("vision_model."), bits(p))
    g = torch.Generator(device="cuda").manual_seed(1)
    enc.set_weight("mm_input_projection_weight",
                   bits((torch.randn(H, TEXT_H, device="cuda", generator=g) / H ** 0.5).to(torch.bfloat16)))
    enc.set_weight("mm_soft_emb_norm.weight", (torch.randn(H, device="cuda", generator=g) * 0.3).cpu().numpy())
    assert not enc.missing_weights(), enc.missing_weights()[:5]
    enc.finalize()
    return enc, v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def check_agreement(hf, enc) -> dict:
    """Both bf16 towers against transformers in float32 on the same (bf16) weights, one image."""
    import copy
    px = torch.rand(1, 3, IMAGE, IMAGE, device="cuda") * 2 - 1
    out = torch.empty(1, IMAGE // PATCH * (IMAGE // PATCH), H, device="cuda")
    with torch.no_grad():
        ref32 = copy.deepcopy(hf).float()
        ref = ref32(pixel_values=px).last_hidden_state
        del ref32
        torch.cuda.empty_cache()
        theirs = hf(pixel_values=px.to(torch.bfloat16)).last_hidden_state.float()
    torch.cuda.synchronize()
    enc.run_device(px.data_ptr(), 1, out.data_ptr(), False)
    r = {"ours_vs_fp32": rel(out, ref), "transformers_bf16_vs_fp32": rel(theirs, ref), "ours_vs_transformers_bf16": rel(out, theirs)}
    r["agree"] = r["ours_vs_fp32"] <= 2 * r["transformers_bf16_vs_fp32"] + 1e-2
    return r


def bench_tower(hf, enc, batches, iters) -> dict:
    res = {}
    for B in batches:
        px = torch.rand(B, 3, IMAGE, IMAGE, device="cuda") * 2 - 1
        px16 = px.to(torch.bfloat16)
        tower = torch.empty(B, (IMAGE // PATCH) ** 2, H, device="cuda")
        proj = torch.empty(B, 256, TEXT_H, device="cuda")
        t_ours = timed(lambda: enc.run_device(px.data_ptr(), B, tower.data_ptr(), False), iters)
        t_proj = timed(lambda: enc.run_device(px.data_ptr(), B, proj.data_ptr(), True), iters)
        with torch.no_grad():
            t_hf = timed(lambda: hf(pixel_values=px16), iters)
        res[B] = {"ours_s": t_ours, "ours_with_projector_s": t_proj, "transformers_s": t_hf,
                  "ours_images_per_s": B / t_ours, "transformers_images_per_s": B / t_hf, "speedup": t_hf / t_ours}
        print(f"  batch {B}: ours {B / t_ours:7.2f} img/s ({t_ours * 1e3:.1f} ms; +projector {t_proj * 1e3:.1f} ms), "
              f"transformers {B / t_hf:7.2f} img/s ({t_hf * 1e3:.1f} ms), speed-up {t_hf / t_ours:.2f}x", flush=True)
        del px, px16, tower, proj
        torch.cuda.empty_cache()
    return res


def path_variants(enc, batches, iters) -> dict:
    """Our tower with each optional path on and off (the others at their defaults), same run: ms."""
    res = {}
    for name in ("qkv_transposed", "fc1_epilogue", "residual_epilogue", "lt_autotune", "residual_bf16",
                 "o_residual_epilogue"):
        was = getattr(enc, name)
        for on in (True, False):
            setattr(enc, name, on)
            for B in batches:
                px = torch.rand(B, 3, IMAGE, IMAGE, device="cuda") * 2 - 1
                tower = torch.empty(B, (IMAGE // PATCH) ** 2, H, device="cuda")
                t = timed(lambda: enc.run_device(px.data_ptr(), B, tower.data_ptr(), False), iters)
                res.setdefault(f"{name}={on}", {})[B] = t * 1e3
                print(f"  {name}={on} batch {B}: {t * 1e3:.2f} ms ({B / t:.2f} img/s)", flush=True)
                del px, tower
        setattr(enc, name, was)
    return res


def ttft_4b(enc, vcfg, reps: int = 5) -> dict:
    """Time to first token of a 4B-shaped text model given one image (1200x900, preprocessed) and a short
    prompt: the library's own steps (images.preprocess, multimodal.image_rows on the CUDA encoder, the
    prefill with image rows and extents as Model._chunks builds them, argmax of the last logits)."""
    from PIL import Image
    from gemma3_native.images import preprocess
    from gemma3_native.multimodal import image_rows
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_e2e import hf_config
    spec = spec_from_dict(hf_config("4B").to_dict(), "bench 4B")
    eng = _cuda.CudaEngine(spec.config, "bfloat16", 1, 2048)
    g = torch.Generator(device="cuda").manual_seed(2)
    t = time.perf_counter()
    for name, shape in eng.expected_weights().items():
        if len(shape) == 1:
            eng.set_weight(name, (torch.randn(shape[0], device="cuda", generator=g) * 0.3).cpu().numpy())
        else:
            w = torch.randn(*shape, device="cuda", generator=g) / shape[-1] ** 0.5
            eng.set_weight(name, bits(w.to(torch.bfloat16)))
            del w
    eng.finalize()
    print(f"  4B-shaped engine ready in {time.perf_counter() - t:.1f}s ({eng.weight_bytes / 1e9:.2f} GB)", flush=True)
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    text_a, text_b = rng.integers(10, 250000, 8).tolist(), rng.integers(10, 250000, 12).tolist()
    ids = np.array([2] + text_a + [vcfg.boi_token_id] + [vcfg.image_token_id] * 256 + [vcfg.eoi_token_id] + text_b,
                   np.int32)
    steps = {"preprocess": [], "vision": [], "prefill": [], "total": []}
    for _ in range(reps + 1):
        eng.reset_all()
        t0 = time.perf_counter()
        px = preprocess(im, IMAGE, False, None).pixel_values
        t1 = time.perf_counter()
        mm = image_rows(enc, ids, px, "bench")
        t2 = time.perf_counter()
        emb, rows, ext = mm.for_chunk(0, len(ids))
        logits = eng.forward(np.array([0], np.int32), np.array([len(ids)], np.int32), ids, False,
                             embeds=np.ascontiguousarray(emb, np.float32), embed_rows=rows, extent=ext)
        int(np.argmax(logits[0]))
        t3 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            steps[k].append(v)
    r = {k: statistics.median(v[1:]) for k, v in steps.items()}  # the first run warms up
    r["prompt_tokens"] = len(ids)
    print(f"  TTFT {r['total'] * 1e3:.1f} ms = preprocess {r['preprocess'] * 1e3:.1f} + vision {r['vision'] * 1e3:.1f} "
          f"+ prefill {r['prefill'] * 1e3:.1f} ({len(ids)} tokens)", flush=True)
    del eng
    return r


# ---- where the time goes ----

def cuda_time(fn, iters: int = 50, warmup: int = 5) -> float:
    """Median seconds of fn() on the current stream, each run between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs) / 1e3


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def stage_breakdown(enc, B: int, iters: int, tower_s: float | None) -> dict:
    """Our encoder per stage at batch B (tower + projector), printed as a markdown table."""
    px = torch.rand(B, 3, IMAGE, IMAGE, device="cuda") * 2 - 1
    proj = torch.empty(B, 256, TEXT_H, device="cuda")
    p = enc.profile_stages(px.data_ptr(), B, proj.data_ptr(), True, iters)
    total = p["total_ms"]
    rows = []
    for name, ms in p["ms"].items():
        fl, by = p["flops"][name], p["bytes"][name]
        rows.append({"stage": name, "ms": ms, "pct": 100 * ms / total if total else 0.0,
                     "tflops": fl / (ms * 1e-3) / 1e12 if fl and ms > 0 else None,
                     "gbps": by / (ms * 1e-3) / 1e9 if by and ms > 0 else None, "flops": fl, "bytes": by})
    is_attn = lambda r: r["stage"].startswith("attention")  # on qh, or on the transposed product
    groups = {"products (cuBLAS)": [r for r in rows if "gemm" in r["stage"]],
              "attention": [r for r in rows if is_attn(r)],
              "elementwise / norms / split": [r for r in rows if "gemm" not in r["stage"] and not is_attn(r)]}
    print(f"\n### Our encoder per stage, batch {B} (tower + projector; {p['layers']} layers; median of {iters}; "
          f"per-layer stages summed over the layers)\n")
    print("| stage | ms | % of total | TFLOP/s | GB/s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['ms']:.3f} | {r['pct']:.1f}% | {_fmt(r['tflops'], '.1f')} | {_fmt(r['gbps'], '.0f')} |")
    gsum = {}
    for g, rs in groups.items():
        ms = sum(r["ms"] for r in rs)
        fl = sum(r["flops"] for r in rs)
        gsum[g] = {"ms": ms, "pct": 100 * ms / total if total else 0.0, "tflops": fl / (ms * 1e-3) / 1e12 if fl and ms else None}
        print(f"| **{g}** | **{ms:.3f}** | **{gsum[g]['pct']:.1f}%** | {_fmt(gsum[g]['tflops'], '.1f')} | |")
    print(f"| **total (first to last event)** | **{total:.3f}** | 100% | | |")
    if tower_s:
        print(f"\n(run_device with the projector, no events, host-timed: {tower_s * 1e3:.3f} ms; the events cost "
              f"{total - tower_s * 1e3:+.3f} ms)")
    del px, proj
    torch.cuda.empty_cache()
    return {"stages": rows, "groups": gsum, "total_ms": total, "run_device_ms": tower_s * 1e3 if tower_s else None,
            "raw": p}


def attention_alone(B: int, iters: int, N: int = (IMAGE // PATCH) ** 2, NH: int = HEADS, D: int = H // HEADS) -> dict:
    """Attention alone on the tower's shapes: ours (k_vision_attention_ptr on the padded q/k/v layout) and
    torch's scaled_dot_product_attention (the backend it picks; each fused backend forced), same inputs."""
    import torch.nn.functional as F
    scale = D ** -0.5
    flops = 4 * B * NH * N * N * D
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, N, NH, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, 16, N, 72] as transformers passes them (strided)
    qh = torch.zeros(3, NH, B, N, 80, device="cuda", dtype=torch.bfloat16)  # [3][heads][img][N][80]
    for i, t in enumerate((qt, kt, vt)):
        qh[i, ..., :D] = t.transpose(0, 1)
    out = torch.empty(B * N, NH * D, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.current_stream().cuda_stream
    ours = lambda kernel="auto": _cuda.k_vision_attention_ptr(out.data_ptr(), qh.data_ptr(), B, N, NH, D, scale, stream,
                                                               kernel)
    kernels = ["mma"] + (["wgmma"] if _cuda.vision_wgmma_available() else [])
    res = {"shape": [B, NH, N, D], "flops": flops, "kernels_ms": {}, "kernels_vs_sdpa_rel": {}}
    res["ours_ms"] = cuda_time(ours, iters) * 1e3
    for kname in kernels:
        res["kernels_ms"][kname] = cuda_time(lambda: ours(kname), iters) * 1e3
    if "wgmma" in kernels:  # the same kernel with its two warpgroups taking turns or not
        was = _cuda.k_vision_wgmma_pingpong(False)
        for pp in (False, True):
            _cuda.k_vision_wgmma_pingpong(pp)
            res["kernels_ms"][f"wgmma pingpong={pp}"] = cuda_time(lambda: ours("wgmma"), iters) * 1e3
        _cuda.k_vision_wgmma_pingpong(was)
        # the kernel on the transposed q/k/v product (the encoder's default there), zero biases
        qkv_t = torch.cat([t.reshape(B * N, NH * D).t() for t in (q, k, v)]).contiguous()  # [3 * NH * D, B * N]
        zb = torch.zeros(NH * D, device="cuda")
        ours_t = lambda: _cuda.k_vision_attention_t_ptr(out.data_ptr(), qkv_t.data_ptr(), zb.data_ptr(), zb.data_ptr(),
                                                        B, N, NH, D, scale, stream)
        res["kernels_ms"]["wgmma transposed qkv"] = cuda_time(ours_t, iters) * 1e3
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
        ref2 = ref.transpose(1, 2).reshape(B * N, NH * D).float()
        if "wgmma" in kernels:
            out.zero_()
            ours_t()
            torch.cuda.synchronize()
            res["kernels_vs_sdpa_rel"]["wgmma transposed qkv"] = rel(out.float(), ref2)
        for kname in kernels:  # (default settings)
            out.zero_()
            ours(kname)
            torch.cuda.synchronize()
            res["kernels_vs_sdpa_rel"][kname] = rel(out.float(), ref2)
        ours()
        torch.cuda.synchronize()
        res["ours_vs_sdpa_rel"] = rel(out.float(), ref2)
        try:
            res["sdpa_picks"] = str(torch.nn.attention.SDPBackend(torch._fused_sdp_choice(qt, kt, vt, scale=scale)).name)
        except Exception as e:  # private API; informative only
            res["sdpa_picks"] = f"unknown ({type(e).__name__})"
        res["sdpa_ms"] = cuda_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale), iters) * 1e3
        qc, kc, vc = (t.contiguous() for t in (qt, kt, vt))
        res["sdpa_contiguous_ms"] = cuda_time(lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=scale), iters) * 1e3
        res["sdpa_backends_ms"] = {}
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                be = getattr(SDPBackend, name, None)
                if be is None:
                    continue
                try:
                    with sdpa_kernel(be):
                        res["sdpa_backends_ms"][name] = cuda_time(
                            lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale), iters) * 1e3
                except Exception as e:
                    res["sdpa_backends_ms"][name] = f"n/a ({str(e).splitlines()[0][:80]})"
        except ImportError:
            pass
    tf = lambda ms: flops / (ms * 1e-3) / 1e12
    print(f"\n### Attention alone, batch {B}: [{B}, {NH}, {N}, {D}] bf16, non-causal ({flops / 1e9:.1f} GFLOP per layer)\n")
    print("| kernel | ms per layer | TFLOP/s | x {L} layers ms |\n|---|---:|---:|---:|".replace("{L}", str(LAYERS)))
    print(f"| ours (vision_attention) | {res['ours_ms']:.3f} | {tf(res['ours_ms']):.1f} | {res['ours_ms'] * LAYERS:.2f} |")
    for kname, ms in res["kernels_ms"].items():
        diff = res["kernels_vs_sdpa_rel"].get(kname)
        print(f"| ours, {kname} kernel{f' (rel. to sdpa {diff:.2e})' if diff is not None else ''} | {ms:.3f} | "
              f"{tf(ms):.1f} | {ms * LAYERS:.2f} |")
    print(f"| torch sdpa, transformers layout (picks {res['sdpa_picks']}) | {res['sdpa_ms']:.3f} | {tf(res['sdpa_ms']):.1f} | "
          f"{res['sdpa_ms'] * LAYERS:.2f} |")
    print(f"| torch sdpa, contiguous [B,16,N,72] | {res['sdpa_contiguous_ms']:.3f} | {tf(res['sdpa_contiguous_ms']):.1f} | "
          f"{res['sdpa_contiguous_ms'] * LAYERS:.2f} |")
    for name, ms in res["sdpa_backends_ms"].items():
        if isinstance(ms, float):
            print(f"| torch sdpa forced {name} | {ms:.3f} | {tf(ms):.1f} | {ms * LAYERS:.2f} |")
        else:
            print(f"| torch sdpa forced {name} | {ms} | | |")
    print(f"(ours vs sdpa on the same inputs: relative difference {res['ours_vs_sdpa_rel']:.2e})")
    del q, k, v, qt, kt, vt, qh, out
    torch.cuda.empty_cache()
    return res


def gemms_alone(B: int, iters: int, stage: dict | None) -> dict:
    """Each product shape of a layer alone: ours (vision_gemm, the encoder's cuBLAS call, bf16 out) and torch
    F.linear with bias (transformers' nn.Linear), against our profiled stage per layer."""
    import torch.nn.functional as F
    R = B * (IMAGE // PATCH) ** 2
    shapes = {"qkv gemm": (R, H, 3 * H), "o gemm": (R, H, H), "fc1 gemm": (R, H, INTER), "fc2 gemm": (R, INTER, H)}
    layers = stage["raw"]["layers"] if stage else None
    res = {}
    print(f"\n### Products alone, batch {B} (M = {R} rows; bf16 in/out, fp32 accumulation; ms per layer)\n")
    print("| product | M x K x N | ours in the encoder (profile / layers) | ours alone (vision_gemm) | torch F.linear+bias | "
          "torch TFLOP/s | ours alone TFLOP/s |\n|---|---|---:|---:|---:|---:|---:|")
    g = torch.Generator(device="cuda").manual_seed(4)
    stream = torch.cuda.current_stream().cuda_stream
    for name, (M, K, N) in shapes.items():
        x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
        b = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        fl = 2 * M * K * N
        t_ours = cuda_time(lambda: _cuda.k_vision_gemm_ptr(out.data_ptr(), x.data_ptr(), w.data_ptr(), M, K, N, True,
                                                          stream), iters) * 1e3
        with torch.no_grad():
            t_torch = cuda_time(lambda: F.linear(x, w, b), iters) * 1e3
            t_torch_nb = cuda_time(lambda: F.linear(x, w), iters) * 1e3
        in_enc = stage["raw"]["ms"].get(name, 0.0) / layers if stage and layers else None
        res[name] = {"M": M, "K": K, "N": N, "flops": fl, "ours_in_encoder_ms": in_enc, "ours_alone_ms": t_ours,
                     "torch_linear_bias_ms": t_torch, "torch_linear_ms": t_torch_nb}
        print(f"| {name} | {M} x {K} x {N} | {_fmt(in_enc, '.3f')} | {t_ours:.3f} | {t_torch:.3f} (no bias {t_torch_nb:.3f}) | "
              f"{fl / (t_torch * 1e-3) / 1e12:.0f} | {fl / (t_ours * 1e-3) / 1e12:.0f} |")
        del x, w, b, out
    torch.cuda.empty_cache()
    return res


def transformers_kernels(hf, B: int, reps: int = 3) -> dict:
    """transformers' forward per CUDA kernel (torch.profiler), per forward, grouped."""
    from torch.profiler import ProfilerActivity, profile
    px16 = (torch.rand(B, 3, IMAGE, IMAGE, device="cuda") * 2 - 1).to(torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            hf(pixel_values=px16)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                hf(pixel_values=px16)
            torch.cuda.synchronize()
    kern = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            kern.append((e.key, us / 1e3 / reps, e.count // reps))
    kern.sort(key=lambda t: -t[1])

    def group(k: str) -> str:
        k = k.lower()
        if any(s in k for s in ("flash", "fmha", "attention", "attn", "cudnn")):
            return "attention"
        if any(s in k for s in ("gemm", "cutlass", "xmma", "sm90", "cublas", "matmul", "nvjet")):
            return "products"
        return "other"
    groups: dict = {}
    for k, ms, _ in kern:
        groups[group(k)] = groups.get(group(k), 0.0) + ms
    total = sum(groups.values()) or 1e-9
    print(f"\n### transformers SiglipVisionModel per CUDA kernel, batch {B} (torch.profiler, per forward; "
          f"total kernel time {total:.2f} ms)\n")
    print("| group | ms | % |\n|---|---:|---:|")
    for gname, ms in sorted(groups.items(), key=lambda t: -t[1]):
        print(f"| {gname} | {ms:.3f} | {100 * ms / total:.1f}% |")
    print("\n| kernel (top 15) | ms | launches | group |\n|---|---:|---:|---|")
    for k, ms, cnt in kern[:15]:
        print(f"| {k[:110].replace('|', '/')} | {ms:.3f} | {cnt} | {group(k)} |")
    del px16
    torch.cuda.empty_cache()
    return {"total_kernel_ms": total, "groups": groups,
            "kernels": [{"name": k, "ms": ms, "launches": c, "group": group(k)} for k, ms, c in kern[:40]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-variants", action="store_true", help="no on/off timings of the optional encoder paths")
    ap.add_argument("--skip-breakdown", action="store_true", help="no per-stage / per-kernel breakdown")
    ap.add_argument("--attention-only", action="store_true", help="only the attention-alone tables, then exit")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    dev = torch.cuda.get_device_name(0)
    if a.attention_only:
        print(f"device: {dev}", flush=True)
        res = {B: attention_alone(B, max(a.iters, 30)) for B in batches}
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "attention_alone.json").write_text(json.dumps({"device": dev, "batches": res}, indent=2))
        return 0
    print(f"device: {dev}; SigLIP {IMAGE}px, {a.layers} layers, bf16", flush=True)
    hf = make_siglip(a.layers)
    enc, vcfg = make_ours(hf, a.layers, max(batches))
    agree = check_agreement(hf, enc)
    print(f"  agreement (relative to transformers fp32): ours {agree['ours_vs_fp32']:.2e}, transformers bf16 "
          f"{agree['transformers_bf16_vs_fp32']:.2e}; ours vs transformers bf16 {agree['ours_vs_transformers_bf16']:.2e}"
          f" -> {'OK' if agree['agree'] else 'DISAGREE'}", flush=True)
    results = {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": a.layers,
               "iters": a.iters, "agreement": agree, "tower": bench_tower(hf, enc, batches, a.iters)}
    if not a.skip_variants:
        results["path_variants_ms"] = path_variants(enc, batches, a.iters)
    if not a.skip_breakdown:
        bd = results["breakdown"] = {"stages": {}, "attention_alone": {}, "gemms_alone": {}, "transformers_kernels": {}}
        def guarded(key, B, fn):  # one failing part costs only its own table
            try:
                bd[key][B] = fn()
            except Exception as e:  # noqa: BLE001
                print(f"\n[{key} at batch {B} failed: {type(e).__name__}: {e}]", flush=True)
                bd[key][B] = {"error": f"{type(e).__name__}: {e}"}
            return bd[key][B]
        for B in batches:
            st = guarded("stages", B, lambda: stage_breakdown(enc, B, a.iters,
                                                                results["tower"][B]["ours_with_projector_s"]))
            guarded("attention_alone", B, lambda: attention_alone(B, max(a.iters, 30)))
            guarded("gemms_alone", B, lambda: gemms_alone(B, max(a.iters, 30), None if "error" in st else st))
            guarded("transformers_kernels", B, lambda: transformers_kernels(hf, B))
    del hf
    torch.cuda.empty_cache()
    if not a.skip_ttft:
        results["ttft_4b_one_image"] = ttft_4b(enc, vcfg)
    print("\n| batch | ours img/s | transformers img/s | speed-up |\n|---|---|---|---|")
    for B, r in results["tower"].items():
        print(f"| {B} | {r['ours_images_per_s']:.2f} | {r['transformers_images_per_s']:.2f} | {r['speedup']:.2f}x |")
    if "ttft_4b_one_image" in results:
        t = results["ttft_4b_one_image"]
        print(f"\nTTFT (4B shape, one image, {t['prompt_tokens']} prompt tokens): {t['total'] * 1e3:.1f} ms "
              f"(preprocess {t['preprocess'] * 1e3:.1f}, vision {t['vision'] * 1e3:.1f}, prefill + first token "
              f"{t['prefill'] * 1e3:.1f})")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_vision.json").write_text(json.dumps(results, indent=2))
    return 0 if agree["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
