"""Is a CUDA GPU usable here? One answer for tests, CLI and chapters."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        import cupy
    except Exception:  # not installed, or a broken CUDA install
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def require_gpu() -> None:
    """Raise a clear error when a GPU-only path is called on a CPU machine."""
    if not gpu_available():
        raise RuntimeError(
            "this needs a CUDA GPU and CuPy (pip install '.[gpu]'); none is visible here. "
            "On a CPU machine, chapters run in replay mode from committed data."
        )


def require_cupy():
    """The ``cupy`` module, after :func:`require_gpu`."""
    require_gpu()
    import cupy

    return cupy
