"""Generated sources stay in step with their generators (CI would otherwise build a stale header)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wgmma_header_is_what_its_generator_writes():
    out = subprocess.run([sys.executable, str(ROOT / "csrc/cuda/gen_wgmma.py")], capture_output=True, text=True,
                         check=True).stdout
    assert out == (ROOT / "csrc/cuda/wgmma.cuh").read_text(), \
        "csrc/cuda/wgmma.cuh differs from gen_wgmma.py's output: run python3 csrc/cuda/gen_wgmma.py > csrc/cuda/wgmma.cuh"
