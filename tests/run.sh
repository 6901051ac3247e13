#!/usr/bin/env bash
# Installs gemma3-native with its test dependencies and runs the whole test suite.
# This is the README's test command, and CI's (.ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The oracle: transformers on a CPU build of torch (torch 2.13.0 is a local wheel on these machines).
$PY -m pip install -q torch==2.13.0
# Build tools, and cuBLAS so that the CUDA module compiles too wherever nvcc is present.
$PY -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" nvidia-cublas
$PY -m pip install -q --no-build-isolation ".[test]"
# pytest exits 5 when it collected no test: that is a failure here, as any non-zero status is.
$PY -m pytest -q -ra tests "$@"
