"""Exact k nearest neighbours by partitioned GEMM tiles, merged by tree reduction.

For query rows :math:`q_i` and train rows :math:`t_j` the squared distance is the one of
scikit-matter's ``pointwise_local_reconstruction_error``, in float64:

.. math::

    d_{ij} = |q_i|^2 + |t_j|^2 - 2\\, q_i \\cdot t_j = |q_i|^2 - 2 h_{ij}, \\qquad
    h_{ij} = [q_i, 1] \\cdot [t_j, -|t_j|^2/2],

so one GEMM per tile gives every :math:`h_{ij}` (the two sums differ only by rounding).

The train rows are split into partitions (the chunks of a dask array, and tiles of at
most ``tile_rows`` rows inside a chunk). For every query block and train tile the
:math:`d_{ij}` come from one GEMM; the ``k`` smallest of each row are kept, and the
candidate lists of the partitions are merged pairwise (a tree reduction), so no
``n_test x n_train`` matrix ever exists.

Order and ties. Neighbours are ordered by increasing distance, and *exact* distance
ties by increasing train position. This total order does not depend on how the train
rows are partitioned, so the result is deterministic and equal to a stable
``np.argsort(d_i, kind="stable")[:k]`` of the full row. scikit-matter calls the default
(unstable, SIMD) ``np.argsort``, whose order among exactly equal distances is arbitrary;
dfre equals it everywhere else. Distances closer than float64 rounding (a few ulps of
:math:`|q|^2 + |t|^2`) may be ordered differently by a different summation order.

Every operation uses the array module of the data (numpy or CuPy).
"""

from __future__ import annotations

import functools
from typing import Any

import dask
import dask.array as da
import numpy as np

from dfre.errors import DfreError
from dfre.linalg.backend import array_module, stable_argsort
from dfre.linalg.scaling import scale_rows

#: Largest number of train rows per GEMM tile (bounds the tile to tile_rows x query rows).
DEFAULT_TILE_ROWS = 8192
#: Query rows per task of :func:`knn`.
DEFAULT_QUERY_BLOCK = 2048
EPS = float(np.finfo(np.float64).eps)
#: Largest k that CuPy's ``argpartition`` selects without sorting the whole row.
CUPY_PARTITION_MAX_K = 512


@functools.cache
def _threadpool_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded_blas():
    """Context: BLAS on one thread inside a task (Dask runs the tasks in parallel)."""
    return _threadpool_controller().limit(limits=1, user_api="blas")


def _first_k_by_distance(dist, idx, k: int):
    """The first ``k`` of every row by a stable sort on distance (ties keep their order)."""
    xp = array_module(dist)
    order = stable_argsort(dist, axis=1)[:, :k]
    return xp.take_along_axis(dist, order, axis=1), xp.take_along_axis(idx, order, axis=1)


def _sort_candidates(dist, idx, k: int):
    """Sort every row of (dist, idx) by distance, then index; keep the first ``k``."""
    xp = array_module(dist)
    by_index = xp.argsort(idx, axis=1)
    return _first_k_by_distance(
        xp.take_along_axis(dist, by_index, axis=1), xp.take_along_axis(idx, by_index, axis=1), k
    )


def _concatenated(a: tuple, b: tuple) -> tuple:
    """Two candidate lists ``(dist, idx)`` of the same queries side by side."""
    xp = array_module(a[0], b[0])
    return xp.concatenate([a[0], b[0]], axis=1), xp.concatenate([a[1], b[1]], axis=1)


def _smallest_in_tile(dist, k: int):
    """Column positions of the ``k`` smallest entries of each row, ties by position."""
    xp = array_module(dist)
    n_cols = dist.shape[1]
    if n_cols <= k:
        return xp.broadcast_to(xp.arange(n_cols), dist.shape).copy()
    if xp is not np and k > CUPY_PARTITION_MAX_K:  # CuPy would sort every row in full
        return smallest_by_bisection(dist, k)
    part = xp.argpartition(dist, k - 1, axis=1)[:, :k]
    kth = xp.take_along_axis(dist, part, axis=1).max(axis=1)
    # argpartition picks arbitrary members of a tie at the k-th distance: redo those rows
    # with a stable sort so the lowest positions win.
    tied = xp.nonzero((dist <= kth[:, None]).sum(axis=1) > k)[0]
    if len(tied):
        part[tied] = stable_argsort(dist[tied], axis=1)[:, :k]
    return part


def _ordered_keys(values):
    """int64 keys with the order of the float64 ``values`` (no NaN): the IEEE bit pattern,
    with the non-sign bits of negative numbers flipped (-0.0 first made +0.0)."""
    xp = array_module(values)
    bits = xp.ascontiguousarray(values + 0.0, dtype=xp.float64).view(xp.int64)
    return xp.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)


def smallest_by_bisection(dist, k: int):
    """Column positions (ascending) of the ``k`` smallest entries of each row, ties at the
    k-th smallest value taken by position, without a sort (one host synchronisation, the
    final ``nonzero``).

    The k-th smallest key of every row is found by bisection on the int64 keys of
    :func:`_ordered_keys` (64 steps, each one comparison and one count per entry): the
    smallest key ``t`` with ``#{key <= t} >= k``. The row keeps every entry below ``t`` and
    the first ``k - #{key < t}`` entries equal to ``t``. Used on GPUs for k above what
    CuPy's ``argpartition`` selects without a full sort; equal to :func:`_smallest_in_tile`.
    """
    xp = array_module(dist)
    keys = _ordered_keys(dist)
    n_rows = keys.shape[0]
    lo = keys.min(axis=1) - 1  # #{key <= lo} = 0 < k
    hi = keys.max(axis=1)  # #{key <= hi} = all >= k
    for _ in range(64):  # hi - lo <= 2**64 halves every step down to hi = lo + 1
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
        enough = (keys <= mid[:, None]).sum(axis=1) >= k
        hi = xp.where(enough, mid, hi)
        lo = xp.where(enough, lo, mid)
    below = keys < hi[:, None]
    at = keys == hi[:, None]
    room = k - below.sum(axis=1)
    keep = below | (at & (xp.cumsum(at, axis=1) <= room[:, None]))
    cols = xp.nonzero(keep)[1]  # row by row, k per row, ascending positions
    return cols.reshape(n_rows, k)


def _closer_than(h, query_sq, kth, col_offset: int):
    """Entries of a tile closer than each row's current ``kth``, as candidates.

    ``h`` holds :math:`q_i \\cdot t_j - |t_j|^2/2`, so :math:`d_{ij} = |q_i|^2 - 2h_{ij}`
    and :math:`d_{ij} < kth_i` needs :math:`h_{ij} > (|q_i|^2 - kth_i)/2`: one comparison
    per entry; a margin of a few ulps admits every entry whose rounded :math:`d_{ij}` may
    fall below :math:`kth_i`, and :math:`d_{ij}` itself decides for those (the others get
    an ``inf`` distance). Returns ``(dist, idx)`` padded to the longest row with ``inf``
    distances (never kept), or ``None`` when no entry passes the margin. Three host
    synchronisations per call on a GPU (``nonzero``, ``bincount`` and the longest row).
    """
    xp = array_module(h)
    cut = 0.5 * (query_sq - kth) - 4.0 * EPS * (xp.abs(query_sq) + xp.abs(kth))
    rows, cols = xp.nonzero(h > cut[:, None])
    if len(rows) == 0:
        return None
    dist = query_sq[rows] - 2.0 * h[rows, cols]
    # an entry past the margin but not closer gets an inf distance (never kept) instead of
    # being dropped: compacting the lists costs a device synchronisation per mask on a GPU
    dist = xp.where(dist < kth[rows], dist, xp.inf)
    counts = xp.bincount(rows, minlength=h.shape[0])
    width = int(counts.max())
    position = xp.arange(len(rows)) - (xp.cumsum(counts) - counts)[rows]
    cand_dist = xp.full((h.shape[0], width), xp.inf)
    cand_idx = xp.zeros((h.shape[0], width), dtype=xp.int64)
    cand_dist[rows, position] = dist
    cand_idx[rows, position] = cols + col_offset
    return cand_dist, cand_idx


def _merge_later(best: tuple, later: tuple, k: int) -> tuple:
    """Merge sorted ``best`` with candidates of larger positions, each row's in order.

    A stable sort by distance of the concatenation is then ordered by (distance,
    position) without sorting the positions first.
    """
    return _first_k_by_distance(*_concatenated(best, later), k)


def knn_partition(queries, train, k: int, offset: int = 0, tile_rows: int = DEFAULT_TILE_ROWS):
    """The ``k`` nearest rows of ``train`` for every row of ``queries``.

    Returns ``(dist, idx)`` of shape (n_queries, min(k, n_train)): float64 squared
    distances and int64 train positions plus ``offset``, sorted by (distance, position).
    ``train`` is processed in tiles of ``tile_rows`` rows, merged as they come: one GEMM
    of :math:`[q, 1]` with :math:`[t, -|t|^2/2]` gives :math:`h = q \\cdot t - |t|^2/2`
    and :math:`d = |q|^2 - 2h`. Once a row holds ``k`` candidates, a later tile only
    offers the entries strictly closer than its current k-th (:func:`_closer_than`; a
    later tile's positions are larger, so an exact tie with the k-th loses): one
    comparison per entry instead of a partial sort, and the GEMM dominates.
    """
    xp = array_module(queries, train)
    queries = xp.asarray(queries, dtype=xp.float64)
    n_queries = queries.shape[0]
    query_sq = xp.sum(queries**2, axis=1)
    q_aug = xp.concatenate([queries, xp.ones((n_queries, 1))], axis=1)
    h_buffer = xp.empty((n_queries, min(tile_rows, train.shape[0])))
    best = None
    for start in range(0, train.shape[0], tile_rows):
        tile = xp.asarray(train[start : start + tile_rows], dtype=xp.float64)
        t_aug = xp.concatenate([tile, -0.5 * xp.einsum("ij,ij->i", tile, tile)[:, None]], axis=1)
        if tile.shape[0] == h_buffer.shape[1]:  # a full tile reuses the buffer
            h = xp.matmul(q_aug, t_aug.T, out=h_buffer)
        else:
            h = xp.matmul(q_aug, t_aug.T)
        if best is not None and best[0].shape[1] == k:
            cand = _closer_than(h, query_sq, best[0][:, -1], offset + start)
            if cand is not None:
                best = _merge_later(best, cand, k)
            continue
        dist = query_sq[:, None] - 2.0 * h
        cols = _smallest_in_tile(dist, k)
        cand = (xp.take_along_axis(dist, cols, axis=1), cols.astype(xp.int64) + (offset + start))
        best = _sort_candidates(*cand, k) if best is None else merge_neighbours(best, cand, k)
    if best is None:
        return xp.zeros((n_queries, 0)), xp.zeros((n_queries, 0), xp.int64)
    return best


def merge_neighbours(a: tuple, b: tuple, k: int) -> tuple:
    """Merge two candidate lists ``(dist, idx)`` of the same queries into the best ``k``."""
    return _sort_candidates(*_concatenated(a, b), k)


def _tree_merge(parts: list, k: int):
    while len(parts) > 1:
        merged = [
            dask.delayed(merge_neighbours, pure=True)(parts[i], parts[i + 1], k)
            for i in range(0, len(parts) - 1, 2)
        ]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0]


def _as_dask(x: Any, name: str, chunk_rows: int) -> da.Array:
    if isinstance(x, da.Array):
        return x
    x = x if hasattr(x, "ndim") else np.asarray(x)
    if x.ndim != 2:
        raise DfreError(f"{name} must be a 2-d array (rows x features), got shape {x.shape}")
    # name=False: no hash of the data for a graph key (for CuPy that is two host copies)
    return da.from_array(x, chunks=(chunk_rows, x.shape[1]), asarray=False, name=False)


def knn_graph(
    queries,
    train,
    k: int,
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
    tile_rows: int = DEFAULT_TILE_ROWS,
    shift=None,
    scale: float = 1.0,
):
    """Delayed ``(dist, idx)`` of the ``k`` nearest train rows of every query row.

    ``queries`` and ``train`` are numpy, CuPy or dask arrays; the train chunks are the
    partitions. With ``shift``/``scale`` both sides are transformed to
    ``(x - shift) / scale`` inside the tasks (float64), as a fitted scaler would.
    One delayed object per query block is returned, in order.
    """
    if k < 1:
        raise DfreError(f"k = {k}: the number of neighbours must be at least 1")
    q = _as_dask(queries, "queries", query_block).rechunk((query_block, -1))
    t = _as_dask(train, "train", 1 << 16).rechunk({1: -1})
    if q.shape[1] != t.shape[1]:
        raise DfreError(
            f"queries have {q.shape[1]} features and train rows {t.shape[1]}: use the same set"
        )
    if k > t.shape[0]:
        raise DfreError(f"k = {k} neighbours but only {t.shape[0]} train rows: lower k")
    offsets = np.concatenate([[0], np.cumsum(t.chunks[0])])
    t_blocks = t.to_delayed().ravel()
    outputs = []
    for q_block in q.to_delayed().ravel():
        qs = dask.delayed(scale_rows, pure=True)(q_block, shift, scale)
        parts = [
            dask.delayed(_knn_scaled, pure=True)(qs, t_block, shift, scale, k, int(off), tile_rows)
            for t_block, off in zip(t_blocks, offsets[:-1], strict=True)
        ]
        outputs.append(_tree_merge(parts, k))
    return outputs


def _knn_scaled(queries, train_block, shift, scale, k, offset, tile_rows):
    with single_threaded_blas():
        train = scale_rows(train_block, shift, scale)
        return knn_partition(queries, train, k, offset, tile_rows)


def knn(queries, train, k: int, **kwargs):
    """``(dist, idx)`` of the ``k`` nearest train rows of each query (see :func:`knn_graph`).

    Computes with the active Dask scheduler; returns arrays of the data's array module.
    """
    parts = dask.compute(*knn_graph(queries, train, k, **kwargs))
    xp = array_module(parts[0][0])
    return (
        xp.concatenate([p[0] for p in parts], axis=0),
        xp.concatenate([p[1] for p in parts], axis=0),
    )
