"""Why the vision attention takes longer inside the encoder than alone (bench/gpu/NOTES.md, Session 9).

Times the wgmma attention on the transposed q/k/v product at SigLIP's shape (batch 8 by default) right after
different preceding work, with CUDA events around the attention only, while nvidia-smi samples the SM clock. If the attention is slower after a product than after itself or after a copy of the same bytes, the
clock (power) is the cause, not the memory system. Run on the GPU machine:
    python3 bench/gpu/probe_attention_context.py [--batch 8] [--iters 200]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

import torch

from gemma3_native import _cuda

N, HEADS, D = 4096, 16, 72
H = HEADS * D


class ClockSampler:
    """nvidia-smi every 20 ms in a background process: the SM clock (MHz). (Its power reading lags by about a
    second, too slow for cases this short.)"""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-lms", "20"],
            stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                mhz = float(line)
            except ValueError:
                continue
            self.rows.append((time.perf_counter(), mhz))

    def between(self, t0: float, t1: float) -> float:
        sel = [m for t, m in self.rows if t0 <= t <= t1]
        return statistics.median(sel) if sel else float("nan")

    def stop(self) -> None:
        self.proc.terminate()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    B, R = a.batch, a.batch * N
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv_t = (torch.randn(3 * H, R, device="cuda", generator=g)).to(torch.bfloat16)
    zero_bias = torch.zeros(H, device="cuda")
    out = torch.empty(R, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(R, H, device="cuda", generator=g).to(torch.bfloat16)
    w_qkv = (torch.randn(3 * H, H, device="cuda", generator=g) / H ** 0.5).to(torch.bfloat16)
    w_fc1 = (torch.randn(4304, H, device="cuda", generator=g) / H ** 0.5).to(torch.bfloat16)
    prod = torch.empty(R, 3 * H, device="cuda", dtype=torch.bfloat16)
    big = torch.empty(R, 4304, device="cuda", dtype=torch.bfloat16)
    other = torch.empty_like(qkv_t)
    stream = torch.cuda.current_stream().cuda_stream

    def attention() -> None:
        _cuda.k_vision_attention_t_ptr(out.data_ptr(), qkv_t.data_ptr(), zero_bias.data_ptr(), zero_bias.data_ptr(),
                                       B, N, HEADS, D, D ** -0.5, stream)

    cases = {
        "after itself": attention,
        "after the qkv product (other buffer)": lambda: torch.matmul(x, w_qkv.t(), out=prod),
        "after the qkv product into its input": lambda: torch.matmul(x, w_qkv.t(), out=qkv_t.view(R, 3 * H)),
        "after qkv + fc1 products": lambda: (torch.matmul(x, w_qkv.t(), out=prod), torch.matmul(x, w_fc1.t(), out=big)),
        "after a copy of its input's bytes (other buffer)": lambda: other.copy_(qkv_t),
        "after a copy into its input": lambda: qkv_t.copy_(other),
        "after 1 ms idle": lambda: torch.cuda._sleep(1_000_000),
    }
    other.copy_(qkv_t)
    sampler = ClockSampler()
    time.sleep(0.5)
    print(f"attention [{B}, {HEADS}, {N}, {D}] on the transposed product, {a.iters} iterations per case; "
          f"device {_cuda.device_name(0)}")
    print("| preceded by | attention ms (median) | p10 | p90 | SM clock MHz (median) |")
    print("|---|---:|---:|---:|---:|")
    for name, pre in cases.items():
        for _ in range(5):  # warm-up
            pre()
            attention()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.iters)]
        t0 = time.perf_counter()
        for e0, e1 in ev:
            pre()
            e0.record()
            attention()
            e1.record()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        ms = sorted(e0.elapsed_time(e1) for e0, e1 in ev)
        mhz = sampler.between(t0, t1)
        print(f"| {name} | {statistics.median(ms):.3f} | {ms[len(ms) // 10]:.3f} | {ms[9 * len(ms) // 10]:.3f} | "
              f"{mhz:.0f} |", flush=True)
    sampler.stop()


if __name__ == "__main__":
    main()
