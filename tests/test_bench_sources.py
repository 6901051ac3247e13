"""The CUDA microbenchmarks (bench/cpp/*.cu) are built only on the GPU machine (cmake -DGEMMA3_BENCH=ON, through
bench/run_gpu.sh); this compiles each of them here as well, wherever nvcc and the cuBLAS headers are found (as CI has
them), so that a change to a kernel header that breaks a benchmark fails before a device run does. Compile only
(nvcc -c, sm_90a as run_gpu.sh builds them): nothing is linked or run."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "bench" / "cpp").glob("*.cu"))


def _cublas_include() -> Path | None:
    """The directory holding cublas_v2.h: the toolkit's beside nvcc, else the nvidia-cublas wheel's (as
    cmake/FindCublasAnywhere.cmake looks)."""
    nvcc = shutil.which("nvcc")
    dirs = []
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        dirs += [root / "include", root / "targets" / "x86_64-linux" / "include"]
    for name in ("nvidia.cu13", "nvidia.cublas", "nvidia.cu12"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.submodule_search_locations:
            dirs += [Path(d) / "include" for d in spec.submodule_search_locations]
    return next((d for d in dirs if (d / "cublas_v2.h").is_file()), None)


def test_bench_sources_found():
    names = {p.name for p in SOURCES}
    assert {"bench_cuda_kernels.cu", "bench_handoff.cu", "bench_stream.cu"} <= names, names


@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_cuda_bench_compiles(src: Path, tmp_path: Path):
    nvcc = shutil.which("nvcc")
    inc = _cublas_include()
    if nvcc is None or inc is None:
        pytest.skip("needs nvcc and the cuBLAS headers (pip install nvidia-cublas)")
    cmd = [nvcc, "-std=c++17", "-arch=sm_90a", "-O1", "--expt-relaxed-constexpr", "-Xcompiler=-fopenmp",
           "-I", str(ROOT / "csrc"), "-I", str(inc), "-c", str(src), "-o", str(tmp_path / "x.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{src.name} does not compile:\n{r.stderr[-4000:]}"
    assert (tmp_path / "x.o").stat().st_size > 0
