"""The compiled core, imported in one place so a missing build gives one clear message."""
try:
    from ._core import *  # noqa: F401,F403
    from . import _core as core  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "gemma3_native's compiled core (_core) is not built: install the package with `pip install .` "
        f"from the repository root ({e})") from e
