"""Array backend: the array module (numpy or cupy) follows the data.

Code in :mod:`dfre.linalg` and :mod:`dfre.metrics` calls :func:`array_module` on its
input blocks and uses the returned module for every operation on them, so numpy
chunks are processed on the CPU and CuPy chunks (on dask-cuda workers) on the GPU
without a host round trip. CuPy is optional: without it everything runs on numpy.

A few operations differ between the two (:func:`stable_argsort`,
:func:`solve_positive_definite`, :func:`thin_svd`): numpy keeps exactly the call it
always made, CuPy gets the batched routine that is fast there. Results that go back to
the process that started a computation are converted to numpy inside the tasks
(:func:`to_numpy`), so a client without CuPy (a login node) never receives a CuPy array.
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


def to_device(block: Any) -> Any:
    """``block`` as a CuPy array on this process's GPU (for ``map_blocks`` on GPU workers:
    CuPy is imported where the task runs, never in the process that builds the graph)."""
    import cupy

    return cupy.asarray(block)


def device_meta(dtype: Any) -> Any:
    """An empty 2-D array of ``dtype`` to describe device chunks: CuPy where CuPy is
    usable here, else numpy (a client without a GPU still builds the same graph)."""
    xp = _cupy if _cupy is not None else np
    return xp.empty((0, 0), dtype=dtype)


def stable_argsort(a: Any, axis: int = -1) -> Any:
    """Indices that sort ``a`` along ``axis``, equal elements in their original order."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.argsort(a, axis=axis)  # CuPy's (Thrust) sort is always stable
    return np.argsort(a, axis=axis, kind="stable")


def solve_positive_definite(a: Any, b: Any) -> Any:
    """Solve :math:`A_i x_i = b_i` for a batch of symmetric positive definite ``a``
    (n_batch, n, n) and ``b`` (n_batch, n, 1).

    numpy: ``numpy.linalg.solve`` (LU). CuPy: ``cupyx.lapack.posv`` (batched Cholesky
    factorisation and solve for any n; ``cupy.linalg.solve`` loops over the matrices
    one ``gesv`` at a time once n > 256).
    """
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        import cupyx.lapack

        return cupyx.lapack.posv(a, b)
    return np.linalg.solve(a, b)


#: Largest matrix side CuPy's batched SVD handles in one batched call (``gesvdjBatched``).
CUPY_BATCHED_SVD_MAX = 32


def thin_svd(x: Any) -> tuple[Any, Any, Any]:
    """Batched thin SVD ``u, s, vt`` of ``x`` (n_batch, m, n) with LAPACK's accuracy.

    numpy: ``numpy.linalg.svd(x, full_matrices=False)``. CuPy batches only matrices up to
    32 x 32 (``gesvdjBatched``) and calls ``gesvd`` once per matrix above that, several
    kernel launches each; those batches are solved on the host by LAPACK instead and the
    factors copied back (the exact local-ridge path, a small share of the neighbourhoods,
    is the only caller).
    """
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        if max(x.shape[-2:]) > CUPY_BATCHED_SVD_MAX:
            u, s, vt = np.linalg.svd(_cupy.asnumpy(x), full_matrices=False)
            return _cupy.asarray(u), _cupy.asarray(s), _cupy.asarray(vt)
        return _cupy.linalg.svd(x, full_matrices=False)
    return np.linalg.svd(x, full_matrices=False)
