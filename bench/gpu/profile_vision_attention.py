"""One launch of each vision attention kernel (mma.sync, then wgmma where available) on SigLIP's shape at
batch 1 ([1, 16, 4096, 72] bf16), for a profiler to look at:

    ncu --kernel-name regex:vision_attention --section SpeedOfLight --section WarpStateStats ... \\
        python3 bench/gpu/profile_vision_attention.py"""
import torch

from gemma3_native import _cuda

B, NH, N, D = 1, 16, 4096, 72
qh = torch.zeros(3, NH, B, N, 80, device="cuda", dtype=torch.bfloat16)  # [3][heads][img][N][80]
qh[..., :D] = torch.randn(3, NH, B, N, D, device="cuda").to(torch.bfloat16)
out = torch.empty(B * N, NH * D, device="cuda", dtype=torch.bfloat16)
stream = torch.cuda.current_stream().cuda_stream
for kernel in ["mma"] + (["wgmma"] if _cuda.vision_wgmma_available() else []):
    _cuda.k_vision_attention_ptr(out.data_ptr(), qh.data_ptr(), B, N, NH, D, D ** -0.5, stream, kernel)
torch.cuda.synchronize()
