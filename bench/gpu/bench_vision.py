"""GPU benchmark of the CUDA vision encoder: SigLIP So400m/14 at 896 px (Gemma 3's tower: hidden 1152,
27 layers, 16 heads of 72, intermediate 4304, 4096 patches) with random bf16 weights generated on the GPU,
against transformers' SiglipVisionModel (bf16, attn_implementation='sdpa', CUDA) on the same weights in
the same run. First checks that the outputs agree (both against transformers in float32 on the same
weights), then times images/s at batch 1 and 8 (median of --iters runs; pixels and outputs stay on the
GPU on both sides; every run ends with a device synchronize). Then the time to first token of a
4B-shaped Gemma 3 (random bf16 weights; hidden 2560, 34 layers, 8 heads, 4 kv heads, head_dim 256,
intermediate 10240, window 1024, 5:1 local:global) given one image and a short prompt: preprocessing
of a 1200x900 image, the vision tower + projector, the prefill with the image block, the first token.
Prints a table; writes $OUT/bench_vision.json.

    python3 bench/gpu/bench_vision.py [--out DIR] [--iters 20] [--layers 27] [--skip-ttft]"""
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-ttft", action="store_true")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    dev = torch.cuda.get_device_name(0)
    print(f"device: {dev}; SigLIP {IMAGE}px, {a.layers} layers, bf16", flush=True)
    hf = make_siglip(a.layers)
    enc, vcfg = make_ours(hf, a.layers, max(batches))
    agree = check_agreement(hf, enc)
    print(f"  agreement (relative to transformers fp32): ours {agree['ours_vs_fp32']:.2e}, transformers bf16 "
          f"{agree['transformers_bf16_vs_fp32']:.2e}; ours vs transformers bf16 {agree['ours_vs_transformers_bf16']:.2e}"
          f" -> {'OK' if agree['agree'] else 'DISAGREE'}", flush=True)
    results = {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": a.layers,
               "iters": a.iters, "agreement": agree, "tower": bench_tower(hf, enc, batches, a.iters)}
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
