"""The compiled core, imported in one place so a missing build gives one clear message."""
import os

# OpenMP threads that spin at each barrier starve when the machine is shared. Measured 2026-11-22 on
# 2 cores with another process busy, 270M decode: 1.5-8 tok/s spinning (default or GOMP_SPINCOUNT=1e4)
# against 25 tok/s with passive waiting; on the quiet machine both give 26-28. Users may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from ._core import *  # noqa: F401,F403,E402
    from . import _core as core  # noqa: F401,E402
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "gemma3_native's compiled core (_core) is not built: install the package with `pip install .` "
        f"from the repository root ({e})") from e
