"""Blocked group statistics of the rows of a tall matrix, tree-reduced by Dask.

The rows of ``Z`` (n, D) — the concatenated feature sets — are sorted into groups by a
label array (a row may belong to one group per label layer, e.g. one per k-fold). For
every group ``g`` one pass over the row chunks gives

.. math::

    n_g, \\qquad \\mu_g = \\frac{1}{n_g} \\sum_{i \\in g} z_i, \\qquad
    M_g = \\sum_{i \\in g} (z_i - \\mu_g)(z_i - \\mu_g)^T

(``solver="gram"``) or an upper-triangular factor :math:`R_g` with
:math:`R_g^T R_g = M_g` (``solver="tsqr"``, see :mod:`dfre.linalg.tsqr`). Each chunk is
centred on its own mean and partial results are merged with the parallel update
(Chan, Golub & LeVeque 1979)

.. math::

    n = n_a + n_b, \\quad \\delta = \\mu_b - \\mu_a, \\quad
    \\mu = \\mu_a + \\delta \\frac{n_b}{n}, \\quad
    M = M_a + M_b + \\frac{n_a n_b}{n} \\delta\\delta^T,

so that a large common offset of the features never cancels catastrophically. All
accumulation is in float64 with the array module of the chunks (numpy, or CuPy on GPU
workers: the reduction never leaves the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from dfre.linalg.backend import array_module, to_numpy

#: Rows of a chunk converted to float64 at a time (bounds the temporaries of a task);
#: on a GPU larger blocks keep the GEMMs large compared with the launch overheads.
SUB_BLOCK_ROWS = 8192
GPU_SUB_BLOCK_ROWS = 1 << 17
#: Partial results merged per task of the reduction tree (fewer when they are large).
TREE_FAN_IN = 8
MERGE_BUDGET_BYTES = 1 << 30


@dataclass
class GroupStatistics:
    """Counts (G,), means (G, D), second moments (G, *, D) and non-finite counts (D,).

    ``second[g]`` is the centred scatter matrix :math:`M_g` (``kind="gram"``) or a factor
    :math:`R_g` with :math:`R_g^T R_g = M_g` (``kind="tsqr"``).
    """

    kind: str
    count: Any
    mean: Any
    second: Any
    nonfinite: Any
    shift: Any = None  # the means are those of the rows minus ``shift`` (D,)

    def to_numpy(self) -> GroupStatistics:
        return GroupStatistics(
            self.kind,
            to_numpy(self.count),
            to_numpy(self.mean),
            to_numpy(self.second),
            to_numpy(self.nonfinite),
            None if self.shift is None else to_numpy(self.shift),
        )

    def scatter(self, g: int) -> np.ndarray:
        """The centred scatter matrix :math:`M_g` of group ``g``."""
        if self.kind == "gram":
            return self.second[g]
        return self.second[g].T @ self.second[g]

    def group(self, g: int) -> tuple[float, np.ndarray, np.ndarray]:
        return float(self.count[g]), self.mean[g], self.second[g]

    def select(self, groups: list[int]) -> GroupStatistics:
        """The statistics of ``groups`` only."""
        return GroupStatistics(
            self.kind,
            self.count[groups],
            self.mean[groups],
            self.second[groups],
            self.nonfinite,
            self.shift,
        )

    def union(self, groups: list[int]) -> GroupStatistics:
        """One group: the union of the (disjoint) rows of ``groups``."""
        return merge_statistics(*[self.select([g]) for g in groups])


def gram_part(z):
    """Count, mean and centred scatter of the float64 rows ``z`` (one group, one block)."""
    xp = array_module(z)
    n = z.shape[0]
    if n == 0:
        d = z.shape[1]
        return 0.0, xp.zeros(d), xp.zeros((d, d))
    mean = z.mean(axis=0)
    c = z - mean
    return float(n), mean, crossproduct(c)


def crossproduct(c):
    """:math:`C^T C`; on the CPU with BLAS ``dsyrk`` (half the flops of a GEMM)."""
    if array_module(c) is not np:
        return c.T @ c
    from scipy.linalg.blas import dsyrk

    upper = dsyrk(1.0, c.T, trans=0)  # c.T is Fortran-ordered: no copy
    return np.triu(upper) + np.triu(upper, 1).T


def gram_merge(a, b):
    """Parallel merge of two (count, mean, scatter) triples."""
    na, ma, sa = a
    nb, mb, sb = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    xp = array_module(delta)
    return n, mean, sa + sb + xp.outer(delta, delta) * (na * nb / n)


def _merge_for(kind: str):
    if kind == "gram":
        return gram_part, gram_merge
    from dfre.linalg.tsqr import tsqr_merge, tsqr_part

    return tsqr_part, tsqr_merge


def chunk_statistics(
    block, labels: np.ndarray, n_values: int, kind: str, shift: np.ndarray | None = None
) -> GroupStatistics:
    """Statistics of every group over one chunk of rows (minus ``shift``, if given).

    ``labels`` (L, rows) holds per label layer the group value of each row in
    ``0..n_values-1`` or -1 (row unused in that layer); group ``l * n_values + v``.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is counted below
        return _chunk_statistics(block, labels, n_values, kind, shift)


def _chunk_statistics(block, labels, n_values, kind, shift) -> GroupStatistics:
    part, merge = _merge_for(kind)
    xp = array_module(block)
    d = block.shape[1]
    layers = labels.shape[0]
    used = (labels >= 0).any(axis=0)
    step = SUB_BLOCK_ROWS if xp is np else GPU_SUB_BLOCK_ROWS
    nonfinite = xp.zeros(d, dtype=np.int64)
    results = []
    for layer in range(layers):
        for value in range(n_values):
            rows = np.flatnonzero(labels[layer] == value)
            acc = part(xp.zeros((0, d)))
            for lo in range(0, len(rows), step):
                idx = rows[lo : lo + step]
                z = xp.take(block, xp.asarray(idx), axis=0).astype(np.float64)
                if shift is not None:
                    z -= xp.asarray(shift)
                acc = merge(acc, part(z))
            results.append(acc)
    # a non-finite value makes its column's mean non-finite (one check per chunk: one
    # device synchronisation on a GPU)
    if not bool(xp.isfinite(xp.stack([mean for _, mean, _ in results])).all()):
        z = block[xp.asarray(used)]
        nonfinite += (~xp.isfinite(z)).sum(axis=0)
    stats = _stack(kind, results, nonfinite, xp)
    stats.shift = shift
    return stats


def _stack(kind, results, nonfinite, xp) -> GroupStatistics:
    count = np.asarray([r[0] for r in results], dtype=np.float64)  # host: read per merge
    mean = xp.stack([r[1] for r in results])
    d = mean.shape[1]
    seconds = [r[2] for r in results]
    if kind == "tsqr":  # pad every factor to D rows so that they stack
        seconds = [
            s if s.shape[0] == d else xp.concatenate([s, xp.zeros((d - s.shape[0], d))])
            for s in seconds
        ]
    return GroupStatistics(kind, count, mean, xp.stack(seconds), nonfinite)


def merge_statistics(*parts: GroupStatistics) -> GroupStatistics:
    """Merge the statistics of disjoint sets of rows, group by group."""
    first = parts[0]
    _, merge = _merge_for(first.kind)
    xp = array_module(first.mean)
    results = []
    for g in range(len(first.count)):
        acc = (float(first.count[g]), first.mean[g], first.second[g])
        for p in parts[1:]:
            acc = merge(acc, (float(p.count[g]), p.mean[g], p.second[g]))
        results.append(acc)
    nonfinite = sum(p.nonfinite for p in parts[1:]) + first.nonfinite
    merged = _stack(first.kind, results, nonfinite, xp)
    merged.shift = first.shift
    return merged


def group_statistics(
    Z: da.Array, labels: np.ndarray, n_values: int, *, solver: str = "gram"
) -> GroupStatistics:
    """One pass over the row chunks of ``Z``: statistics of every labelled group.

    The per-chunk results are merged by a tree of fan-in :data:`TREE_FAN_IN` (less when
    ``fan_in`` partial results would exceed :data:`MERGE_BUDGET_BYTES`) and computed
    with the active Dask scheduler (the current ``distributed.Client`` if there is one).
    The result is on the host (numpy). Every row is first shifted by one data row (read
    before the pass) so that a large common offset of the features costs no accuracy;
    the means are those of the shifted rows (``result.shift``).
    """
    if solver not in ("gram", "tsqr"):
        raise ValueError(f"unknown solver {solver!r}")
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[None]
    Z = Z.rechunk({1: -1})
    used = np.flatnonzero((labels >= 0).any(axis=0))
    blocks = Z.to_delayed().ravel()
    bounds = np.cumsum((0, *Z.chunks[0]))
    # The shift row is read inside the same graph (not by a compute of its own, whose
    # differently optimised keys would clash with this pass's on a distributed scheduler).
    row = int(used[0]) if len(used) else 0
    block = int(np.searchsorted(bounds, row, side="right")) - 1
    shift = dask.delayed(_shift_row, pure=True)(blocks[block], row - int(bounds[block]))
    chunk = dask.delayed(chunk_statistics, pure=True)
    merge = dask.delayed(merge_statistics, pure=True)
    # the labels travel to the workers once, not inside the graph (n_rows bytes per fold)
    from dfre.cluster import shared

    edges = zip(bounds[:-1], bounds[1:], strict=True)
    chunk_labels = shared([labels[:, lo:hi] for lo, hi in edges])
    parts = [
        chunk(blk, chunk_label, n_values, solver, shift)
        for blk, chunk_label in zip(blocks, chunk_labels, strict=True)
    ]
    n_groups = labels.shape[0] * n_values
    result_bytes = 8 * n_groups * Z.shape[1] * (Z.shape[1] + 1)
    fan_in = int(min(TREE_FAN_IN, max(2, MERGE_BUDGET_BYTES // result_bytes)))
    while len(parts) > 1:
        parts = [merge(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    # converted to numpy in the last task: a client without CuPy never receives CuPy arrays
    (result,) = compute(dask.delayed(GroupStatistics.to_numpy, pure=True)(parts[0]))
    return result


def _shift_row(block, row: int) -> np.ndarray:
    """Row ``row`` of ``block`` on the host in float64; non-finite entries set to 0
    (non-finite values are reported by the checks, not propagated)."""
    shift = to_numpy(block[row]).astype(np.float64)
    shift[~np.isfinite(shift)] = 0.0
    return shift


def compute(*collections):
    """``dask.compute`` with the active scheduler. Under Dask's local threaded scheduler,
    whose threads already use every core, BLAS runs single-threaded meanwhile (no
    oversubscription); distributed workers set their own thread counts."""
    import dask.threaded
    from threadpoolctl import threadpool_limits

    from dfre import progress  # its tasks are counted in the step shown (dfre.progress)

    found = [c for c in collections if dask.is_dask_collection(c)]
    scheduler = dask.base.get_scheduler(collections=found) if found else dask.base.get_scheduler()
    if scheduler is None or scheduler is dask.threaded.get:  # None: the threaded default
        with threadpool_limits(limits=1, user_api="blas"):
            return progress.compute(*collections)
    return progress.compute(*collections)
