"""One-off: which rounding model cuBLASLt's bf16 accumulate epilogue (x = x + a.w^T + bias, x and bias bf16)
follows: the share of outputs equal to each model's bits."""
import numpy as np
from gemma3_native import _cuda


def r16(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


rng = np.random.default_rng(0)
for M, K, N in [(37, 129, 53), (300, 72, 144), (5, 4304, 24), (256, 1152, 1152)]:
    x = r16(rng.standard_normal((M, N)).astype(np.float32) * 3)
    a = r16(rng.standard_normal((M, K)).astype(np.float32))
    w = r16((rng.standard_normal((N, K)) * K ** -0.5).astype(np.float32))
    b = r16(rng.standard_normal(N).astype(np.float32))
    got = _cuda.k_vision_gemm_residual(x, a, w, b, bf16_resid=True)
    ab = (a.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    models = {
        "bf16(x + ab + b)": r16(x + ab + b),
        "bf16(ab + b + x)": r16((ab + b) + x),
        "bf16(x + bf16(ab + b))": r16(x + r16(ab + b)),
        "bf16(x + bf16(ab) + b)": r16(x + r16(ab) + b),
        "bf16(bf16(x + ab) + b)": r16(r16(x + ab) + b),
        "bf16(bf16(ab + x) + b) bias last": r16(r16(ab + x) + b),
        "bf16(ab + bf16(x + b))": r16(ab + r16(x + b)),
    }
    print(f"M={M} K={K} N={N}: " + "; ".join(f"{k}: {np.mean(got == v):.3f}" for k, v in models.items()), flush=True)
