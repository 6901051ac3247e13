"""The compiled core, imported in one place so a missing build gives one clear message."""
import os

# OpenMP threads that spin long at each barrier starve when the machine is shared: measured on 2
# cores with other work running, decode fell from ~15 to 1.5 tok/s. A short spin keeps the low
# wake-up latency of back-to-back parallel regions without that collapse. Users may override it.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

try:
    from ._core import *  # noqa: F401,F403,E402
    from . import _core as core  # noqa: F401,E402
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "gemma3_native's compiled core (_core) is not built: install the package with `pip install .` "
        f"from the repository root ({e})") from e
