"""Local feature reconstruction error (LFRE) of every pair of feature sets.

LFRE(F → F') (paper Sec. II A, eqs. 4–8; scikit-matter's
``pointwise_local_reconstruction_error``) reconstructs each test environment :math:`i`
from a ridge map fitted on its ``k`` nearest train neighbours in the source space. With
both feature sets scaled by skmatter's ``StandardFlexibleScaler`` fitted on the train
rows, the neighbourhood :math:`\\mathcal N_i` (first k of the argsort of the float64
squared distances :math:`|x_j|^2 + |x_i|^2 - 2 x_i \\cdot x_j`) gives means
:math:`\\bar x, \\bar x'`, a map :math:`P^{(i)}` from ``Ridge2FoldCV`` on the centred
neighbourhood, and

.. math::

    \\tilde x'_i = \\bar x' + (x_i - \\bar x) P^{(i)}, \\qquad
    \\mathrm{LFRE} = \\sqrt{\\frac{1}{n_{test}} \\sum_i \\| x'_i - \\tilde x'_i \\|^2 } .

The paper takes :math:`k = \\min(d_F, d_{F'})`.

dfre computes the same numbers with a partitioned exact kNN (:mod:`dfre.linalg.knn`,
computed once per source and reused for every target) and batched local ridge solves
(:mod:`dfre.linalg.local_ridge`, source decompositions shared by targets of the same k),
both as Dask tasks on the active scheduler, numpy or CuPy following the data. With a
k-fold selection every environment is a query once, its neighbours taken from the other
folds (full-dataset mode); the scaler is refitted on each fold's train rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from dfre import progress
from dfre.data.selection import skmatter_default_split
from dfre.errors import DfreError
from dfre.linalg.backend import array_module, device_meta, to_device, to_numpy
from dfre.linalg.gram import crossproduct
from dfre.linalg.knn import (
    DEFAULT_QUERY_BLOCK,
    DEFAULT_TILE_ROWS,
    knn_graph,
    single_threaded_blas,
)
from dfre.linalg.local_ridge import DEFAULT_ALPHAS, RANDOM_STATE, fold_positions, local_ridge
from dfre.linalg.scaling import ZERO_VARIANCE, scale_rows
from dfre.linalg.spectrum import SetSpectrum, unit_roundoff
from dfre.lock import writes_store
from dfre.metrics.diagnostics import Diagnostics, describe_rows, diagnose, selection_warnings
from dfre.metrics.uncertainty import bootstrap_standard_error, uncertainty_arrays

#: Bytes of float64 work arrays one local-ridge batch may use (numpy; CuPy gets 64x: at
#: k = 128 and 512 -> 128 that is about 1,400 neighbourhoods per batched call, so the
#: launch and synchronisation costs of a batch are shared by enough work on a GPU).
RIDGE_BATCH_BYTES = 1 << 27
#: Train rows per kNN partition (task): each partition starts its candidate lists afresh,
#: so fewer, larger partitions do less merging; a million rows still give 8 per source.
KNN_PARTITION_ROWS = 1 << 17
#: Queries per local-ridge task on CPU: a query block is split so that every (source, k)
#: gives several tasks and the Dask threads share the dominant (largest k) work evenly.
CPU_RIDGE_QUERIES = 128


@dataclass
class LfreResult:
    """All source→target LFREs of ``names`` (row i = source, column j = target)."""

    names: list[str]
    matrix: np.ndarray  # (M, M) LFRE
    k: np.ndarray  # (M, M) neighbours used per pair
    alpha: np.ndarray  # (M, M) median relative alpha chosen over the neighbourhoods
    pointwise: np.ndarray  # (M, M, n_test) ||x'_i - x~'_i|| per test environment
    test_rows: np.ndarray  # (n_test,) rows of the test environments, all folds concatenated
    selection: Any = None
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    error: np.ndarray | None = None  # (M, M) bootstrap standard error of ``matrix``
    diagnostics: Diagnostics | None = None
    spectra: list[SetSpectrum] | None = None


@dataclass
class _Scaler:
    """skmatter's StandardFlexibleScaler fitted on train rows: (x - mean) / scale, and the
    noise floor per train row: ``roundoff / scale`` times the row's stored norm."""

    mean: np.ndarray
    scale: float
    roundoff: float = 0.0


# ---------------------------------------------------------------------- inputs
def _as_dask(x: Any, name: str) -> da.Array:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str):
        from dfre.store import Store

        store = x[0] if isinstance(x[0], Store) else Store.open(x[0])
        x = store.features(x[1])
    if not isinstance(x, da.Array):
        x = x if array_module(x) is not np else np.asarray(x)
        # name=False: the in-memory data is not hashed for a graph key
        x = da.from_array(x, chunks=(1 << 16, -1), asarray=False, name=False)
    if x.ndim != 2:
        raise DfreError(f"feature set {name} must be 2-D (rows, features), got shape {x.shape}")
    return x


def _feature_arrays(features, names) -> tuple[list[str], list[da.Array]]:
    if isinstance(features, Mapping):
        names = list(features) if names is None else list(names)
        items = list(features.values())
    else:
        items = list(features)
        names = [f"X{i}" for i in range(len(items))] if names is None else list(names)
    if len(names) != len(items) or not items:
        raise DfreError(f"{len(names)} names for {len(items)} feature sets: give one per set")
    arrays = [_as_dask(x, n) for x, n in zip(items, names, strict=True)]
    rows = {a.shape[0] for a in arrays}
    if len(rows) > 1:
        detail = ", ".join(f"{n}: {a.shape[0]}" for n, a in zip(names, arrays, strict=True))
        raise DfreError(
            f"feature sets have different numbers of rows ({detail}): they must describe "
            "the same environments in the same order"
        )
    return names, arrays


def _check_rows(rows, what: str, n_rows: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
        raise DfreError(f"{what} rows must be a 1-D array of integer row indices")
    if rows.size == 0:
        raise DfreError(f"the {what} selection is empty: choose at least one {what} row")
    if rows.min() < 0 or rows.max() >= n_rows:
        raise DfreError(f"{what} rows must lie in 0..{n_rows - 1} (the feature rows)")
    return rows.astype(np.int64)


def _folds_of(selection: Any, n_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if hasattr(selection, "folds"):
        folds = list(selection.folds)
    elif isinstance(selection, tuple) and len(selection) == 2:
        folds = [selection]
    else:
        raise DfreError("selection must be a dfre Selection or a (train_rows, test_rows) pair")
    return [(_check_rows(tr, "train", n_rows), _check_rows(te, "test", n_rows)) for tr, te in folds]


def k_matrix(dims: Sequence[int], k: int | str | None = None) -> np.ndarray:
    """Neighbours per pair: ``k`` everywhere, or a rule on the two dimensions.

    ``None`` or ``"min"``: :math:`\\min(d_F, d_{F'})`, the paper's choice for the model
    comparisons; ``"max"``: :math:`\\max(d_F, d_{F'})`, the choice its *text* states for
    the cumulant orders (Fig. 8). Note that the paper's own analysis code uses the minimum
    there too; ``"max"`` follows the text, ``"min"`` (the default) the code.
    """
    dims = np.asarray(dims, dtype=np.int64)
    if k is None or k == "min":
        return np.minimum(dims[:, None], dims[None, :])
    if k == "max":
        return np.maximum(dims[:, None], dims[None, :])
    if isinstance(k, str) or isinstance(k, bool) or int(k) != k:
        raise DfreError(f"k = {k!r}: give a number of neighbours, 'min' or 'max'")
    return np.full((len(dims), len(dims)), int(k), dtype=np.int64)


def k_rule(k: int | str | None) -> str:
    """How :func:`k_matrix` chose the neighbours, for a result's attributes."""
    if k is None or k == "min":
        return "min(d_F, d_F')"
    return "max(d_F, d_F')" if k == "max" else "fixed"


def parse_k(text: str) -> int | str:
    """``--k`` on the command line: a number of neighbours, ``min`` or ``max``."""
    if text in ("min", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise DfreError(f"--k {text}: give a number of neighbours, min or max") from None


def _check_k(kmat: np.ndarray, n_train: int) -> None:
    kmat = kmat[kmat > 0]
    if kmat.min() < 2:
        raise DfreError(
            f"k = {kmat.min()} neighbours: the local 2-fold ridge needs k >= 2; choose --k 2 "
            "or more"
        )
    if kmat.max() > n_train:
        raise DfreError(
            f"k = {kmat.max()} neighbours but only {n_train} train environments: lower k "
            "or select more train rows"
        )


# ---------------------------------------------------------------------- scaling
def _fit_and_scale(block, name: str):
    """skmatter's StandardFlexibleScaler fitted on one feature set's train rows and applied.

    With :math:`s` the first row (so large offsets cost no accuracy) and
    :math:`c = x - s` in float64, :math:`\\mu = s + \\bar c` and the scale is
    :math:`\\sigma = (\\sum_j \\overline{c_j^2} - \\bar c_j^2)^{1/2}` (total variance 1
    after scaling). One float64 array is allocated and scaled in place:
    :math:`(c - \\bar c)/\\sigma`. Returns ``(scaled rows, mean, total variance, stored
    norms, spectrum)``: the norms :math:`\\|x_i\\|` of the stored rows (for the noise floor
    of a neighbourhood) and the singular values of the centred rows from their Gram
    matrix (:class:`~dfre.linalg.spectrum.SetSpectrum`, for the diagnostics).
    """
    xp = array_module(block)
    shift = xp.asarray(block[0], dtype=xp.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN/inf/overflow: refused later
        rows = xp.subtract(block, shift, dtype=xp.float64)
        norms = xp.sqrt(xp.maximum(xp.einsum("ij,ij->i", rows + shift, rows + shift), 0.0))
        offset = rows.sum(axis=0) / rows.shape[0]
        squares = xp.einsum("ij,ij->j", rows, rows) / rows.shape[0]
        variance = float(xp.sum(xp.maximum(squares - offset**2, 0.0)))
    rows -= offset
    spectrum = _gram_spectrum(rows, norms, block.dtype, name)
    if variance > 0:
        rows /= np.sqrt(variance)
    return rows, to_numpy(shift + offset), variance, norms, spectrum


def _gram_spectrum(centred, norms, dtype, name: str) -> SetSpectrum:
    """Spectrum of centred rows from their Gram matrix (resolved to ~1e-7 of s_max)."""
    xp = array_module(centred)
    n, d = centred.shape
    with np.errstate(over="ignore", invalid="ignore"):
        gram = to_numpy(crossproduct(centred))
    # non-finite features are refused with their own message once this task returns
    lam = np.linalg.eigvalsh(gram)[::-1] if np.isfinite(gram).all() else np.zeros(d)
    s = np.sqrt(np.clip(lam, 0.0, None))[: min(n, d)]
    floor = unit_roundoff(dtype) * float(to_numpy(xp.sqrt(xp.sum(norms**2))))
    ratio = float(s[-1] / s[0]) if len(s) and s[0] > 0 else 0.0
    return SetSpectrum(name, d, float(n), s, floor, ratio, exact=False)


# ---------------------------------------------------------------------- one block of queries
def _ridge_batch(k: int, dims: Sequence[int], xp) -> int:
    per_item = 8 * 8 * (k * k + k * sum(dims))
    budget = RIDGE_BATCH_BYTES * (64 if xp is not np else 1)
    return max(1, budget // per_item)


def _scaled(x, scaler: _Scaler):
    return scale_rows(x, scaler.mean, scaler.scale)


def _ridge_block(x_train, x_query, y_trains, y_queries, neighbours, alphas, rows=None, noise=None):
    """Pointwise errors and chosen alphas of one query block for several targets.

    All rows are scaled float64. ``neighbours`` (b, k) are positions into the train
    arrays; all targets share k. ``rows`` (a slice) picks the b queries out of the query
    blocks (default all). ``noise`` = ``(stored row norms of the source train rows,
    roundoff / scale)`` asks for the noise-aware cutoff floor of each neighbourhood.
    Returns ``(errors (T, b), alphas (T, b), n_exact)``.
    """
    if rows is not None:
        x_query = x_query[rows]
        y_queries = [y[rows] for y in y_queries]
    with single_threaded_blas():
        errors, chosen, n_exact = _ridge_block_body(
            x_train, x_query, y_trains, y_queries, neighbours, alphas, noise
        )
    # host arrays: what goes back to the client is numpy even when the block ran on CuPy
    return to_numpy(errors), to_numpy(chosen), int(n_exact)


def _ridge_block_of_knn(
    x_train, x_query, y_trains, y_queries, knn_indices, k, rows, alphas, noise=None
):
    """:func:`_ridge_block` for the queries ``rows`` (a slice) of a query block whose kNN
    indices ``knn_indices`` are still on the worker that computed them (first ``k``)."""
    neighbours = knn_indices[rows, :k]
    return _ridge_block(x_train, x_query, y_trains, y_queries, neighbours, alphas, rows, noise)


def _ridge_block_body(x_train, x_query, y_trains, y_queries, neighbours, alphas, noise):
    xp = array_module(x_train)
    neighbours = xp.asarray(neighbours)
    n_query, k = neighbours.shape
    # gathered straight into fold order: local_ridge then slices its folds
    neighbours = neighbours[:, xp.asarray(np.concatenate(fold_positions(k)))]
    dims = [x_train.shape[1], *[y.shape[1] for y in y_trains]]
    batch = _ridge_batch(k, dims, xp)
    errors = xp.empty((len(y_trains), n_query))
    chosen = xp.empty((len(y_trains), n_query))
    n_exact = 0
    for start in range(0, n_query, batch):
        stop = min(start + batch, n_query)
        idx = neighbours[start:stop]
        floor = None
        if noise is not None:  # u ||X_nbr||_F of the stored rows, in scaled units
            norms, factor = noise
            floor = factor * xp.sqrt(xp.sum(norms[idx] ** 2, axis=1))
        results = local_ridge(
            x_train[idx],
            [y[idx] for y in y_trains],
            x_query[start:stop],
            alphas,
            fold_ordered=True,
            floor=floor,
        )
        for t, res in enumerate(results):
            residual = y_queries[t][start:stop] - res.prediction
            errors[t, start:stop] = xp.linalg.norm(residual, axis=1)
            chosen[t, start:stop] = res.alpha
        n_exact += results[0].n_exact
    return errors, chosen, n_exact


def _all_finite(arr: da.Array):
    """Delayed bool: whether every entry of ``arr`` is finite (decided in a task, so the
    client receives a Python bool, not a device array)."""
    return dask.delayed(bool, pure=True)(da.isfinite(arr).all())


def _single_block(arr: da.Array):
    """A delayed holding the whole of ``arr`` as one array (moved once per worker)."""
    return arr.rechunk({0: -1, 1: -1}).to_delayed().ravel()[0]


# ---------------------------------------------------------------------- one fold
def _knn_indices(neighbours):
    """The indices of a kNN result ``(dist, idx)``."""
    return neighbours[1]


def _persist_and_wait(collections):
    """``dask.persist`` of ``collections`` (nested lists of delayed), finished on return:
    on a distributed cluster the results stay on the workers as futures."""
    from distributed import futures_of, wait

    (persisted,) = dask.persist(collections)
    futures = futures_of(persisted)
    if futures:  # else Dask's local scheduler has already computed everything
        wait(futures)
    return persisted


def _scaled_rows(trains, tests, names):
    """Scaled float64 train rows (one block each), their scalers, and scaled test rows.

    Made once per fold and persisted -- in memory, or on the workers of a distributed
    cluster -- then shared by the kNN (whose partitions are slices of the train block)
    and every ridge task. NaN/inf features and constant feature sets are refused.
    """
    fitted = dask.persist(
        *[
            dask.delayed(_fit_and_scale, pure=True)(_single_block(t), name)
            for t, name in zip(trains, names, strict=True)
        ]
    )
    stats = dask.compute(*[(f[1], f[2]) for f in fitted])
    spectra = list(dask.compute(*[f[4] for f in fitted]))
    finite = dask.compute(*[_all_finite(t) for t in tests])
    scalers = []
    for name, train, (mean, variance), test_ok in zip(names, trains, stats, finite, strict=True):
        if not (np.isfinite(variance) and np.isfinite(mean).all() and bool(test_ok)):
            if bool(test_ok) and dask.compute(_all_finite(train))[0]:
                raise DfreError(
                    f"feature set {name} has values too large for float64 sums of squares "
                    "(above about 1e150): rescale it"
                )
            raise DfreError(
                f"feature set {name} has NaN or infinite values in the selected rows: mask "
                "those atoms (featurize records them) or fix the features"
            )
        if not variance >= ZERO_VARIANCE:
            raise DfreError(
                f"feature set {name} is constant on the train rows (total variance "
                f"{variance:.3g}): it cannot be scaled; drop it or check how it was computed"
            )
        scale = float(np.sqrt(variance))
        scalers.append(_Scaler(mean, scale, unit_roundoff(train.dtype) / scale))
    train_blocks = [f[0] for f in fitted]
    norms = [f[3] for f in fitted]
    tests = dask.persist(
        *[t.map_blocks(_scaled, s, dtype=np.float64) for t, s in zip(tests, scalers, strict=True)]
    )
    partitioned = [
        da.from_delayed(
            block, shape=t.shape, dtype=np.float64, meta=array_module(t).empty((0, 0))
        ).rechunk((KNN_PARTITION_ROWS, -1))
        for block, t in zip(train_blocks, trains, strict=True)
    ]
    return train_blocks, partitioned, list(tests), norms, scalers, spectra


def _fold_errors(arrays, names, train, test, kmat, alphas, opts, timings, fold=""):
    """Pointwise errors (M, M, n_test) and alphas of one fold (train/test rows as given).

    Two Dask computations: the kNN of every source (once, at the largest k it needs),
    then every local-ridge task of every source. ``fold`` names the fold in progress lines.
    """
    n_sets = len(arrays)
    trains = [a[train] for a in arrays]
    tests = [a[test] for a in arrays]
    query_block = opts["query_block"]
    tests = [t.rechunk((query_block, -1)) for t in tests]
    with progress.phase(f"LFRE{fold}: scaling {n_sets} feature sets on {len(train):,} rows"):
        train_blocks, partitioned, tests, norms, scalers, spectra = _scaled_rows(
            trains, tests, names
        )
    test_blocks = [t.to_delayed().ravel() for t in tests]
    sources = [i for i in range(n_sets) if kmat[i].any()]
    started = time.perf_counter()
    graphs = [
        knn_graph(
            tests[i],
            partitioned[i],
            int(kmat[i].max()),
            query_block=query_block,
            tile_rows=opts["tile_rows"],
        )
        for i in sources
    ]
    # the kNN indices stay where they were computed (persisted: futures on a distributed
    # cluster) and go straight into the ridge tasks, never through this process
    indices = [[dask.delayed(_knn_indices, pure=True)(part) for part in parts] for parts in graphs]
    with progress.phase(
        f"LFRE{fold}: exact kNN of {len(test):,} test rows for {len(sources)} source(s)"
    ):
        neighbours = dict(zip(sources, _persist_and_wait(indices), strict=True))
    timings["knn_seconds"] += time.perf_counter() - started
    timings["knn_queries"] += len(test) * len(sources)
    started = time.perf_counter()
    bounds = np.concatenate([[0], np.cumsum(tests[0].chunks[0])])
    tasks, keys = [], []
    for i in sources:
        for k_value in np.unique(kmat[i][kmat[i] > 0])[::-1]:  # largest (slowest) first
            targets = [int(j) for j in np.flatnonzero(kmat[i] == k_value)]
            for b, nbr in enumerate(neighbours[i]):
                n_queries = int(bounds[b + 1] - bounds[b])
                for lo in range(0, n_queries, opts["ridge_queries"]):
                    hi = min(lo + opts["ridge_queries"], n_queries)
                    tasks.append(
                        dask.delayed(_ridge_block_of_knn, pure=False)(
                            train_blocks[i],
                            test_blocks[i][b],
                            [train_blocks[j] for j in targets],
                            [test_blocks[j][b] for j in targets],
                            nbr,
                            int(k_value),
                            slice(lo, hi),
                            alphas,
                            (norms[i], scalers[i].roundoff) if opts["noise_floor"] else None,
                        )
                    )
                    keys.append((i, targets, slice(bounds[b] + lo, bounds[b] + hi)))
    pointwise = np.full((n_sets, n_sets, len(test)), np.nan)
    alpha = np.full((n_sets, n_sets, len(test)), np.nan)
    n_pairs = int((kmat > 0).sum())
    with progress.phase(f"LFRE{fold}: local ridge of {len(test):,} test rows, {n_pairs} pair(s)"):
        solved = progress.compute(*tasks)
    for (i, targets, rows), (err, chosen, n_exact) in zip(keys, solved, strict=True):
        pointwise[i, targets, rows] = to_numpy(err)
        alpha[i, targets, rows] = to_numpy(chosen)
        timings["exact_neighbourhoods"] += int(n_exact)
        timings["ridge_neighbourhoods"] += int(rows.stop - rows.start)
    timings["ridge_solves"] += len(test) * int((kmat > 0).sum())
    timings["ridge_seconds"] += time.perf_counter() - started
    return pointwise, alpha, spectra


# ---------------------------------------------------------------------- public API
def lfre_matrix(
    features: Mapping[str, Any] | Sequence[Any],
    selection: Any,
    k: int | str | None = None,
    *,
    names: Sequence[str] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    device: str | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    query_block: int | None = None,
    tile_rows: int | None = None,
    alpha_floor: str | float | None = None,
    describe: Any = None,
    row_name: str = "environments",
) -> LfreResult:
    """LFRE of every source→target pair of the feature sets ``features``.

    ``features``: a name→array mapping or a list of arrays (numpy, CuPy, dask, or a
    ``(store, "model/layer")`` pair), all with the same rows. ``selection``: a
    :class:`~dfre.data.selection.Selection` (one fold, or k folds for the full-dataset
    mode) or a ``(train_rows, test_rows)`` pair. ``k``: neighbours for every pair
    (default :math:`\\min(d_F, d_{F'})` per pair; ``"max"`` takes the larger dimension, as
    the paper's Fig. 8). ``pairs``: only these (source, target)
    index pairs (the others are NaN, k 0). ``device="cuda"`` moves the chunks to CuPy.
    ``alpha_floor``: ``None`` (skmatter's grid, the paper's protocol), ``"auto"`` (no cutoff
    below the storage noise floor :math:`u \\|X_{\\mathcal N}\\|_F` of each neighbourhood,
    see :mod:`dfre.linalg.spectrum`) or a relative cutoff every alpha is raised to.
    ``describe(rows)`` names environments for the diagnostics of flagged entries;
    ``row_name`` says what a row is in the sanity warnings.
    Computes with the active Dask scheduler. The result carries bootstrap error bars
    (:mod:`dfre.metrics.uncertainty`) and diagnostics (:mod:`dfre.metrics.diagnostics`).
    """
    names, arrays = _feature_arrays(features, names)
    if device == "cuda":  # CuPy is imported in the tasks, not here (a login node has none)
        arrays = [a.map_blocks(to_device, dtype=a.dtype, meta=device_meta(a.dtype)) for a in arrays]
    elif device not in (None, "cpu"):
        raise DfreError(f"device {device!r} is not known: use cpu or cuda")
    gpu = device == "cuda" or array_module(arrays[0]) is not np
    opts = {
        "query_block": query_block or (4 * DEFAULT_QUERY_BLOCK if gpu else DEFAULT_QUERY_BLOCK),
        "tile_rows": tile_rows or (2 * DEFAULT_TILE_ROWS if gpu else DEFAULT_TILE_ROWS),
    }
    # GPUs want the largest batches; CPU threads want several tasks per (source, k).
    opts["ridge_queries"] = opts["query_block"] if gpu else CPU_RIDGE_QUERIES
    n_rows = arrays[0].shape[0]
    folds = _folds_of(selection, n_rows)
    kmat = k_matrix([a.shape[1] for a in arrays], k)
    if pairs is not None:
        wanted = np.zeros_like(kmat, dtype=bool)
        for i, j in pairs:
            wanted[i, j] = True
        kmat = np.where(wanted, kmat, 0)
    alphas = np.asarray(alphas, dtype=np.float64)
    opts["noise_floor"] = alpha_floor == "auto"
    if alpha_floor not in (None, "none", "auto"):
        try:
            floor = float(alpha_floor)
        except (TypeError, ValueError):
            raise DfreError(
                f"alpha floor {alpha_floor!r}: give 'auto', 'none' or a relative cutoff in [0, 1)"
            ) from None
        if not 0 <= floor < 1:
            raise DfreError(f"alpha floor {floor}: a relative cutoff lies in [0, 1)")
        alphas = np.maximum(alphas, min(floor, alphas.max()))
    timings = dict.fromkeys(
        ["knn_seconds", "ridge_seconds", "knn_queries", "ridge_solves"], 0.0
    ) | {"ridge_neighbourhoods": 0, "exact_neighbourhoods": 0}
    parts, alpha_parts, spectra = [], [], None
    for number, (train, test) in enumerate(folds, start=1):
        _check_k(kmat, len(train))
        fold = f" fold {number}/{len(folds)}" if len(folds) > 1 else ""
        pw, al, sp = _fold_errors(arrays, names, train, test, kmat, alphas, opts, timings, fold)
        parts.append(pw)
        alpha_parts.append(al)
        spectra = spectra or sp
    pointwise = np.concatenate(parts, axis=2)
    alpha_all = np.concatenate(alpha_parts, axis=2)
    with np.errstate(invalid="ignore"):
        matrix = np.sqrt(np.mean(pointwise**2, axis=2))
    config = {
        "k": k,
        "k_rule": k_rule(k),
        "alphas": [float(a) for a in alphas],
        "alpha_type": "relative",
        "regularization_method": "cutoff",
        "scoring": "neg_root_mean_squared_error",
        "random_state": RANDOM_STATE,
        "scaler": "StandardFlexibleScaler (fitted on the train rows of each fold)",
        "n_folds": len(folds),
        "query_block": opts["query_block"],
        "tile_rows": opts["tile_rows"],
        "ridge_queries": opts["ridge_queries"],
        "device": "cuda" if gpu else "cpu",
        "alpha_floor": None if alpha_floor in (None, "none") else str(alpha_floor),
    }
    test_rows = np.concatenate([te for _, te in folds]).astype(np.int64)
    error = bootstrap_standard_error(pointwise)
    sources = [i for i in range(len(names)) if kmat[i].any()]
    diagnostics = diagnose(
        names,
        matrix,
        pointwise,
        test_rows,
        error=error,
        warnings=selection_warnings(
            names, [a.shape[1] for a in arrays], folds, sources, k=kmat, rows=row_name
        ),
        feature_sets={sp.name: sp.to_json() for sp in spectra},
        describe=describe,
    )
    config["diagnostics"] = diagnostics.to_json()
    return LfreResult(
        names=list(names),
        matrix=matrix,
        k=kmat,
        alpha=np.median(alpha_all, axis=2),
        pointwise=pointwise,
        test_rows=test_rows,
        selection=selection,
        config=config,
        timings=timings,
        error=error,
        diagnostics=diagnostics,
        spectra=spectra,
    )


@writes_store("dfre lfre")
def lfre_store(
    store: Any,
    names: Sequence[str],
    selection_spec: Any = "stratified:1000",
    *,
    k: int | str | None = None,
    run: str = "lfre",
    seed: int = 0,
    **options: Any,
) -> LfreResult:
    """LFRE matrix of the feature sets ``names`` of ``store``, written to ``results/<run>``.

    ``selection_spec`` (``stratified:N``, ``random:N``, ``structure:N``, ``kfold:K``) is
    built over the rows valid in every feature set (or pass a ready Selection). The store
    is written only after everything was computed. ``options`` go to :func:`lfre_matrix`.
    """
    from dfre.data.selection import selection_for_store
    from dfre.store import Store, check_run_name

    check_run_name(run)  # before any work
    st = store if isinstance(store, Store) else Store.open(store, mode="r+")
    names = list(names)
    if not names:
        raise DfreError("give at least one feature set")
    if len(set(names)) != len(names):
        raise DfreError(f"feature sets are repeated in {names}: give each once")
    arrays = [st.features(name) for name in names]  # unknown names raise here
    selection = selection_spec
    if isinstance(selection_spec, str):
        selection = selection_for_store(selection_spec, st, seed=seed, valid=st.valid_rows(names))
    result = lfre_matrix(
        arrays, selection, k, names=names, describe=lambda rows: describe_rows(st, rows), **options
    )
    result.config["seed"] = seed
    write_result(st, run, result)
    return result


@writes_store("dfre lfre")
def write_result(store: Any, run: str, result: LfreResult) -> None:
    """Write ``result`` into ``results/<run>`` of ``store`` (the results contract)."""
    if not store.writable:
        from dfre.store import Store

        store = Store.open(store.path, mode="r+")
    arrays = {
        "matrix": result.matrix.astype(np.float64),
        "alpha": result.alpha.astype(np.float64),
        "k": result.k.astype(np.int64),
        "test_rows": result.test_rows.astype(np.int64),
        "pointwise": result.pointwise.astype(np.float64),
        **uncertainty_arrays(result),
    }
    store.write_run(run, "lfre", result, arrays)


# ---------------------------------------------------------------------- skmatter-compatible
def _is_default_scaler(scaler: Any) -> bool:
    from skmatter.preprocessing import StandardFlexibleScaler

    return scaler is None or (
        type(scaler) is StandardFlexibleScaler
        and scaler.with_mean
        and scaler.with_std
        and not scaler.column_wise
        and scaler.rtol == 0
        and scaler.atol == ZERO_VARIANCE
    )


def _default_estimator_alphas(estimator: Any) -> np.ndarray | None:
    """The alphas of ``estimator`` if it is skmatter's default Ridge2FoldCV but for them."""
    from skmatter.linear_model import Ridge2FoldCV

    if estimator is None:
        return DEFAULT_ALPHAS
    if (
        type(estimator) is Ridge2FoldCV
        and estimator.alpha_type == "relative"
        and estimator.regularization_method == "cutoff"
        and estimator.cv is None
        and estimator.shuffle
        and estimator.random_state == RANDOM_STATE
        and estimator.scoring == "neg_root_mean_squared_error"
    ):
        return np.atleast_1d(np.asarray(estimator.alphas, dtype=np.float64))
    return None


def pointwise_local_reconstruction_error(
    X,
    Y,
    n_local_points,
    test_idx=None,
    train_idx=None,
    scaler=None,
    estimator=None,
    n_jobs=None,
):
    """skmatter's ``pointwise_local_reconstruction_error``, computed by dfre.

    :math:`\\|x'_i - \\tilde x'_i\\|` for every test row (in ``test_idx`` order), with
    :math:`\\tilde x'_i = \\bar x' + (x_i - \\bar x) P^{(i)}` fitted on the
    ``n_local_points`` nearest train rows (see the module docstring). ``X`` and ``Y`` are
    numpy, CuPy or dask arrays, or ``(store, "model/layer")`` pairs. Defaults are
    skmatter's; a non-default ``scaler`` or ``estimator`` is handed to skmatter itself.
    ``n_jobs`` is accepted for compatibility: the active Dask scheduler sets parallelism.
    """
    _, (x, y) = _feature_arrays([X, Y], ["X", "Y"])
    n_rows = x.shape[0]
    if n_rows < n_local_points:
        raise DfreError(
            f"X has {n_rows} samples but n_local_points={n_local_points}: must have at "
            "least n_local_points samples"
        )
    alphas = _default_estimator_alphas(estimator)
    if alphas is None or not _is_default_scaler(scaler):
        from skmatter.metrics import pointwise_local_reconstruction_error as reference

        return reference(
            to_numpy(x.compute()),
            to_numpy(y.compute()),
            n_local_points,
            test_idx=test_idx,
            train_idx=train_idx,
            scaler=scaler,
            estimator=estimator,
            n_jobs=n_jobs,
        )
    train, test = skmatter_default_split(n_rows, train_idx, test_idx)
    train = _check_rows(train, "train", n_rows)
    test = _check_rows(test, "test", n_rows)
    result = lfre_matrix([x, y], (train, test), int(n_local_points), alphas=alphas, pairs=[(0, 1)])
    return result.pointwise[0, 1]


def local_reconstruction_error(
    X,
    Y,
    n_local_points,
    test_idx=None,
    train_idx=None,
    scaler=None,
    estimator=None,
    n_jobs=None,
):
    """skmatter's ``local_reconstruction_error``: :math:`\\|LRE^{(i)}\\| / \\sqrt{n_{test}}`.

    Same arguments as :func:`pointwise_local_reconstruction_error`.
    """
    values = pointwise_local_reconstruction_error(
        X,
        Y,
        n_local_points,
        test_idx=test_idx,
        train_idx=train_idx,
        scaler=scaler,
        estimator=estimator,
        n_jobs=n_jobs,
    )
    return float(np.linalg.norm(values) / np.sqrt(len(values)))
