"""Array backend: the array module (numpy or cupy) follows the data.

Code in :mod:`dfre.linalg` and :mod:`dfre.metrics` calls :func:`array_module` on its
input blocks and uses the returned module for every operation on them, so numpy
chunks are processed on the CPU and CuPy chunks (on dask-cuda workers) on the GPU
without a host round trip. CuPy is optional: without it everything runs on numpy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

try:  # pragma: no cover - exercised only where CuPy and a GPU exist
    import cupy as _cupy

    _cupy.cuda.runtime.getDeviceCount()
except Exception:  # ImportError, or CuPy without a usable CUDA device
    _cupy = None


def gpu_available() -> bool:
    """True when CuPy is importable and sees at least one CUDA device."""
    return _cupy is not None


def array_module(*arrays: Any) -> ModuleType:
    """``cupy`` if any of ``arrays`` is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
            meta = getattr(a, "_meta", None)  # dask array with CuPy chunks
            if meta is not None and isinstance(meta, _cupy.ndarray):
                return _cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A host numpy copy of ``a`` (no copy when it is already numpy)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)
