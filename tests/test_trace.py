"""The kernel timeline (csrc/cuda/trace.cuh, built with GEMMA3_TRACE=ON) and its reader (bench/gpu/trace_decode.py).
The traced build runs only on the GPU machine (bench/run_gpu.sh --trace); here: the reader's arithmetic on made-up
records, its record layout and kernel tags against the header's, and the traced sources compiling (nvcc -c)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from test_bench_sources import _cublas_include

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import trace_decode as td  # noqa: E402


def _tag(file: str, line: int) -> int:
    return (td.fnv16(file) << 16) | line


def _recs(rows: list[tuple]) -> np.ndarray:
    """rows of (gridid, t0, tw, t1, file, line, grid) in ns"""
    r = np.zeros(len(rows), dtype=td.REC)
    for i, (gid, t0, tw, t1, f, line, grid) in enumerate(rows):
        r[i]["gridid"], r[i]["t0"], r[i]["tw"], r[i]["t1"] = gid, t0, tw, t1
        r[i]["tag"], r[i]["grid"], r[i]["block"] = _tag(f, line), grid, i
    return r


def test_reader_orders_launches_and_adds_up():
    # three launches, their records shuffled; gridids not in launch order (the reader orders by first entry)
    rows = [(9, 2000, 2600, 5200, "attention_decode_tc.cu", 36, 3), (7, 20, 110, 1400, "gemm.cu", 37, 2),
            (3, 600, 1900, 2500, "residual_rmsnorm.cu", 21, 1), (7, 0, 100, 1000, "gemm.cu", 37, 2),
            (9, 2100, 2650, 5000, "attention_decode_tc.cu", 36, 3)]
    ls = td.launches(_recs(rows), td.tag_names())
    assert [x["name"] for x in ls] == ["gemm:37", "residual_rmsnorm:21", "attention_decode_tc:36"]
    assert [x["n"] for x in ls] == [2, 1, 2]
    a, b, c = ls
    assert (a["t0"], a["tw"], a["t1"]) == (0, 100, 1400)  # first entry, first wait, last exit
    rows = td.critical_path(ls)
    assert rows[0]["handoff"] == pytest.approx(0.5) and rows[0]["work"] == pytest.approx(0.6)
    assert rows[1]["handoff"] == pytest.approx(0.1) and rows[1]["work"] == pytest.approx(2.6)
    # the shares telescope: the last launch's end minus the first's
    assert sum(r["share"] for r in rows) == pytest.approx((c["t1"] - a["t1"]) / 1e3)


def test_reader_names_every_cuda_source():
    names = td.tag_names()
    sources = sorted(p.name[:-3] for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sorted(names.values()) == sources  # and no two files share a 16-bit hash


def test_record_layout():
    assert td.REC.itemsize == 80
    assert 'static_assert(sizeof(Rec) == 80' in (ROOT / "csrc" / "cuda" / "trace.cuh").read_text()


def _nvcc() -> tuple[str, Path]:
    nvcc, inc = shutil.which("nvcc"), _cublas_include()
    if nvcc is None or inc is None:
        pytest.skip("needs nvcc and the CUDA headers (pip install nvidia-cublas)")
    return nvcc, inc


def test_kernel_tags_match_the_reader(tmp_path: Path):
    """trace.cuh's constexpr tag (FNV-1a of the file name after the last '/', and the line) as the reader
    computes it."""
    nvcc, inc = _nvcc()
    src = tmp_path / "tag.cu"
    src.write_text('#include <cstdio>\n#include "cuda/trace.cuh"\nint main() {\n'
                   '  std::printf("%u %u\\n", g3trace::tag("/x/y/csrc/cuda/gemm.cu", 37),\n'
                   '              g3trace::tag("sampling.cu", 405));\n}\n')
    exe = tmp_path / "tag"
    r = subprocess.run([nvcc, "-std=c++17", "-DG3_TRACE=1", "-I", str(ROOT / "csrc"), "-I", str(inc), str(src), "-o",
                        str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout.split()
    assert [int(v) for v in out] == [_tag("gemm.cu", 37), _tag("sampling.cu", 405)]


@pytest.mark.parametrize("src", ["residual_rmsnorm.cu", "attention_decode_tc.cu", "cuda_module.cu"])
def test_traced_sources_compile(src: str, tmp_path: Path):
    """The hooks (a scope object in every kernel, the marks, the bindings) compile in a GEMMA3_TRACE build."""
    nvcc, inc = _nvcc()
    cmd = [nvcc, "-std=c++17", "-arch=sm_90a", "-O1", "--expt-relaxed-constexpr", "-DG3_TRACE=1", "-DG3_HAVE_SM90A=1",
           "-I", str(ROOT / "csrc"), "-I", str(inc)]
    if src == "cuda_module.cu":
        pybind11 = pytest.importorskip("pybind11")
        cmd += ["-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"], "-Xcompiler=-fPIC"]
    r = subprocess.run(cmd + ["-c", str(ROOT / "csrc" / "cuda" / src), "-o", str(tmp_path / "x.o")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{src} does not compile with G3_TRACE:\n{r.stderr[-4000:]}"
