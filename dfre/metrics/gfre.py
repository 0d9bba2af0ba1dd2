"""Global feature reconstruction error (GFRE) of every pair of feature sets, in one pass.

GFRE(F → F') (paper Sec. II A, eqs. 2–3) is the test RMSE of the best linear map from
the scaled features :math:`\\tilde X` of F to the scaled features :math:`\\tilde X'` of F':

.. math::

    \\mathrm{GFRE} = \\sqrt{\\frac{1}{n_{test}} \\sum_{i \\in test}
        \\| \\tilde x'_i - \\tilde x_i W \\|^2 },

with the scaler (skmatter's ``StandardFlexibleScaler``) fitted on the train rows and
:math:`W` chosen by skmatter's ``Ridge2FoldCV`` (2-fold CV over relative cutoff alphas).

:func:`gfre_matrix` computes it for all M×M source→target pairs from ONE pass over the
rows: per chunk, statistics (count, mean, centred Gram or TSQR factor) of the
concatenated features for the train fold 1, train fold 2 and test rows of every
selection fold, tree-reduced by Dask (:mod:`dfre.linalg.gram`); every pair's scaling,
cross-validation, refit and test error then follow exactly from those statistics
(:mod:`dfre.linalg.ridge`). Optional pointwise errors take a second pass over the test
rows only, once the weights are known.

Solvers. ``"gram"`` accumulates centred Gram matrices (normal equations). Their rounding
errors are of order :math:`\\epsilon\\, s_{max}^2`, so a ridge map fitted from them matches
the SVD path (skmatter's) only while the kept singular values stay well above
:math:`\\sqrt{d\\epsilon}\\, s_{max}`. ``"tsqr"`` keeps triangular QR factors instead (about
3x the time per row on CPU, still one pass) and reproduces skmatter's SVD path to working
precision. ``"auto"`` (the default) makes the Gram pass, reads every source set's
spectrum from it (:mod:`dfre.linalg.spectrum`) and, when one reaches below
:data:`~dfre.linalg.spectrum.GRAM_RESOLVED` of its largest singular value while the cutoff
grid reaches there too -- the last-layer features of real models do, their spectra decay
to :math:`10^{-10}` -- makes the exact TSQR pass as well and fits every pair from it.
The result's ``config`` says which path was taken and for which sets.

Every result carries error bars (:mod:`dfre.metrics.uncertainty`: bootstrap over the
test environments) and diagnostics (:mod:`dfre.metrics.diagnostics`: spectra of the
feature sets, tail shares, flags, sanity warnings). ``alpha_floor="auto"`` is an opt-in
noise-aware variant of skmatter's protocol: no cutoff below the storage noise floor of
the source features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from sklearn.model_selection import KFold

from dfre import progress
from dfre.data.selection import skmatter_default_split
from dfre.errors import DfreError
from dfre.linalg.backend import array_module, to_numpy
from dfre.linalg.gram import GroupStatistics, compute, group_statistics
from dfre.linalg.ridge import (
    FoldData,
    RidgeSettings,
    factor_svd,
    procrustes_weights,
    ridge_2fold_cv,
)
from dfre.linalg.scaling import FlexibleScaling, flexible_scaling, scaled_factor
from dfre.linalg.spectrum import SetSpectrum, set_spectra
from dfre.lock import writes_store
from dfre.metrics.diagnostics import Diagnostics, describe_rows, diagnose, selection_warnings
from dfre.metrics.uncertainty import bootstrap_standard_error, uncertainty_arrays

#: skmatter's defaults for the reconstruction measures.
DEFAULT_ALPHAS = tuple(np.geomspace(1e-9, 0.9, 20))
RANDOM_STATE = 0x5F3759DF
DEFAULT_CHUNK_ROWS = 1 << 15

FOLD1, FOLD2, TEST = 0, 1, 2
GROUPS_PER_FOLD = 3
SOLVERS = ("auto", "gram", "tsqr")


@dataclass
class GfreResult:
    """All source→target GFREs of ``names`` (row i = source, column j = target)."""

    names: list[str]
    matrix: np.ndarray  # (M, M)
    alpha: np.ndarray  # (M, M) chosen alpha (relative to s_max when alpha_type="relative")
    cka: np.ndarray  # (M, M) linear CKA over the selected rows
    test_rows: np.ndarray  # (n_test,) rows of the test environments, all folds concatenated
    pointwise: np.ndarray | None = None  # (M, M, n_test) per-environment error norms
    distortion: np.ndarray | None = None  # (M, M) GFRD where computed (NaN elsewhere)
    pointwise_distortion: np.ndarray | None = None
    config: dict = field(default_factory=dict)
    selection: Any = None
    error: np.ndarray | None = None  # (M, M) bootstrap standard error of ``matrix``
    diagnostics: Diagnostics | None = None
    spectra: list[SetSpectrum] | None = None


@dataclass
class _FoldModel:
    """What one selection fold learned: scaling, weights and test residuals per pair."""

    scaling: FlexibleScaling
    weights: dict
    alpha: dict
    residual: dict  # (a, b) -> sum of squared test residuals
    distortion_weights: dict
    distortion: dict
    n_test: float


# ---------------------------------------------------------------------- inputs
def as_dask(x: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> da.Array:
    """A 2-D dask array over ``x`` (numpy, CuPy or dask), one column chunk."""
    if not isinstance(x, da.Array) and array_module(x) is np:
        x = np.asarray(x)
    if x.ndim != 2:
        raise DfreError(f"features must be 2-D (rows, features), got shape {x.shape}")
    if isinstance(x, da.Array):
        return x
    # name=False: no hash of the data for a graph key (for CuPy that is two host copies)
    return da.from_array(x, chunks=(chunk_rows, -1), asarray=False, name=False)


def feature_arrays(
    features: Mapping[str, Any] | Sequence[Any],
    store: Any = None,
    names: Sequence[str] | None = None,
) -> tuple[list[str], list[da.Array]]:
    """Names and dask arrays of ``features``: arrays, a name→array mapping, or store names."""
    if isinstance(features, Mapping):
        names = list(features) if names is None else list(names)
        items = list(features.values())
    else:
        items = list(features)
        if names is None:
            names = [f if isinstance(f, str) else f"X{i}" for i, f in enumerate(items)]
    if len(names) != len(items):
        raise DfreError(f"{len(names)} names given for {len(items)} feature sets")
    arrays = []
    for item in items:
        if isinstance(item, str):
            if store is None:
                raise DfreError(f"feature set '{item}' is a name: pass store= to read it")
            from dfre.store import Store

            st = store if isinstance(store, Store) else Store.open(store)
            item = st.features(item)
        arrays.append(as_dask(item))
    rows = {a.shape[0] for a in arrays}
    if len(rows) > 1:
        detail = ", ".join(f"{n}: {a.shape[0]}" for n, a in zip(names, arrays, strict=True))
        raise DfreError(
            f"feature sets have different numbers of rows ({detail}): they must "
            "describe the same environments"
        )
    return list(names), arrays


def _concatenate(arrays: list[da.Array]) -> da.Array:
    chunks = arrays[0].chunks[0]
    return da.concatenate([a.rechunk({0: chunks, 1: -1}) for a in arrays], axis=1)


def _folds_of(selection: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    if hasattr(selection, "folds"):
        return [(np.asarray(tr), np.asarray(te)) for tr, te in selection.folds]
    if isinstance(selection, tuple) and len(selection) == 2:
        return [(np.asarray(selection[0]), np.asarray(selection[1]))]
    raise DfreError("selection must be a dfre Selection or a (train_rows, test_rows) pair")


def _check_rows(rows: np.ndarray, what: str, n_rows: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise DfreError(f"{what} rows must be a 1-D array of integer row indices")
    rows = rows.astype(np.int64)
    if rows.size == 0:
        raise DfreError(f"the {what} selection is empty: choose at least one {what} row")
    if rows.min() < 0 or rows.max() >= n_rows:
        raise DfreError(f"{what} rows must lie in 0..{n_rows - 1} (the feature rows)")
    if len(np.unique(rows)) != len(rows):
        raise DfreError(f"{what} rows contain duplicates: give every row once")
    return rows


def fold_labels(folds, n_rows: int, *, random_state=RANDOM_STATE, shuffle=True):
    """Label layers (K, n_rows) int8: FOLD1/FOLD2 (skmatter's inner KFold of the train
    rows, in the order given) or TEST per selection fold, -1 for unused rows."""
    labels = np.full((len(folds), n_rows), -1, dtype=np.int8)
    for k, (train, test) in enumerate(folds):
        train = _check_rows(train, "train", n_rows)
        test = _check_rows(test, "test", n_rows)
        if np.intersect1d(train, test).size:
            raise DfreError("train and test rows overlap: a row can only be in one of them")
        if len(train) < 2:
            raise DfreError(
                f"only {len(train)} train row(s): the 2-fold cross-validation needs at least 2"
            )
        kfold = KFold(n_splits=2, shuffle=shuffle, random_state=random_state if shuffle else None)
        first, second = next(kfold.split(np.arange(len(train))))
        labels[k, train[first]] = FOLD1
        labels[k, train[second]] = FOLD2
        labels[k, test] = TEST
    return labels


# ---------------------------------------------------------------------- fitting
def _check_finite(stats: GroupStatistics, names, slices) -> None:
    for name, sl in zip(names, slices, strict=True):
        bad = int(stats.nonfinite[sl].sum())
        if bad:
            raise DfreError(
                f"feature set {name} has {bad} NaN or infinite values in the selected rows: "
                "recompute those features or exclude the rows (feature mask)"
            )


def _fit_fold(stats, k, names, slices, settings, pairs, dist_pairs) -> _FoldModel:
    """Scaling, ridge maps and test residuals of selection fold ``k``; ``settings`` maps
    each source index to its :class:`RidgeSettings`."""
    solver = stats.kind
    base = GROUPS_PER_FOLD * k
    train = stats.union([base + FOLD1, base + FOLD2])
    n_train, mean_train, second_train = train.group(0)
    scaling = flexible_scaling(
        n_train, mean_train, np.diag(train.scatter(0)), slices, names, stats.shift
    )
    f1, f2, fte = (
        scaled_factor(solver, *stats.group(base + g), scaling) for g in (FOLD1, FOLD2, TEST)
    )
    ftr = scaled_factor(solver, n_train, mean_train, second_train, scaling)
    svds = {
        a: [
            factor_svd(f.matrix[:, slices[a]], f.floor, exact=solver == "tsqr")
            for f in (f1, f2, ftr)
        ]
        for a in sorted({a for a, _ in pairs})
    }
    model = _FoldModel(scaling, {}, {}, {}, {}, {}, fte.count)
    for a, b in pairs:
        sa, sb = slices[a], slices[b]
        data = [
            FoldData(f.matrix[:, sa], f.matrix[:, sb], f.count, svd)
            for f, svd in zip((f1, f2, ftr), svds[a], strict=True)
        ]
        fit = ridge_2fold_cv(*data, int(n_train), settings[a])
        xt = fte.matrix[:, sa]
        model.weights[a, b] = fit.weights
        model.alpha[a, b] = fit.alpha
        model.residual[a, b] = float(((fte.matrix[:, sb] - xt @ fit.weights) ** 2).sum())
        if (a, b) in dist_pairs:
            omega = procrustes_weights(ftr.matrix[:, sa], fit.weights)
            model.distortion_weights[a, b] = omega
            model.distortion[a, b] = float(((xt @ (fit.weights - omega)) ** 2).sum())
    return model


def _cka(stats: GroupStatistics, slices) -> np.ndarray:
    """Linear CKA over all rows of the first fold's groups (train and test).

    .. math:: \\mathrm{CKA}(X, Y) = \\frac{\\|X_c^T Y_c\\|_F^2}
              {\\|X_c^T X_c\\|_F\\, \\|Y_c^T Y_c\\|_F}
    """
    scatter = stats.union(list(range(GROUPS_PER_FOLD))).scatter(0)
    m = len(slices)
    norms = [np.linalg.norm(scatter[sl, sl]) for sl in slices]
    out = np.empty((m, m))
    for a in range(m):
        for b in range(m):
            cross = scatter[slices[a], slices[b]]
            out[a, b] = float((cross**2).sum()) / (norms[a] * norms[b])
    return out


# ---------------------------------------------------------------------- pointwise pass
def _scaled_rows(block, rows, scaling):
    xp = array_module(block)
    z = block[xp.asarray(rows)].astype(np.float64) - xp.asarray(scaling.shift)
    return (z - xp.asarray(scaling.mean)) / xp.asarray(scaling.column_scale)


def _pointwise_chunk(block, rows, scaling, slices, pairs, weights, n_sets):
    """Per-environment error norms (M, M, len(rows)) of one chunk's test rows."""
    xp = array_module(block)
    out = np.full((n_sets, n_sets, len(rows)), np.nan)
    if not len(rows):
        return out
    z = _scaled_rows(block, rows, scaling)
    for a, b in pairs:
        w = xp.asarray(weights[a, b])
        err = z[:, slices[b]] - z[:, slices[a]] @ w
        out[a, b] = to_numpy(xp.sqrt((err**2).sum(axis=1)))
    return out


def _pointwise_distortion_chunk(block, rows, scaling, slices, pairs, diff, n_sets):
    xp = array_module(block)
    out = np.full((n_sets, n_sets, len(rows)), np.nan)
    if not len(rows):
        return out
    z = _scaled_rows(block, rows, scaling)
    for a, b in pairs:
        err = z[:, slices[a]] @ xp.asarray(diff[a, b])
        out[a, b] = to_numpy(xp.sqrt((err**2).sum(axis=1)))
    return out


def _pointwise_pass(Z, labels, models, slices, pairs, n_sets, dist_pairs):
    """Second pass over the test rows of every fold (rows in increasing order per fold)."""
    from dfre.cluster import shared

    Z = Z.rechunk({1: -1})
    blocks = Z.to_delayed().ravel()
    bounds = np.cumsum((0, *Z.chunks[0]))
    errors, distortions = [], []
    for k, model in enumerate(models):
        # weights (sum of d_a d_b floats), scaling and test rows travel to the workers
        # once, not inside the graph
        diff = {p: model.weights[p] - model.distortion_weights[p] for p in dist_pairs}
        tested = [
            (blk, np.flatnonzero(labels[k, lo:hi] == TEST))
            for blk, lo, hi in zip(blocks, bounds[:-1], bounds[1:], strict=True)
        ]
        tested = [(blk, rows) for blk, rows in tested if len(rows)]
        scaling, w, diff, *chunk_rows = shared(
            [model.scaling, model.weights, diff, *(rows for _, rows in tested)]
        )
        for (blk, _), rows in zip(tested, chunk_rows, strict=True):
            errors.append(
                dask.delayed(_pointwise_chunk)(blk, rows, scaling, slices, pairs, w, n_sets)
            )
            if dist_pairs:
                distortions.append(
                    dask.delayed(_pointwise_distortion_chunk)(
                        blk, rows, scaling, slices, dist_pairs, diff, n_sets
                    )
                )
    errors, distortions = compute(errors, distortions)
    pw = np.concatenate(errors, axis=2)
    pd = np.concatenate(distortions, axis=2) if dist_pairs else None
    return pw, pd


# ---------------------------------------------------------------------- choices
def _alpha_floors(alpha_floor, spectra, settings: RidgeSettings, sources) -> dict[int, float]:
    """Relative cutoff floor per source: none, the storage noise floor, or a number."""
    if alpha_floor is None or alpha_floor == "none":
        return {}
    if settings.alpha_type != "relative" or settings.regularization_method != "cutoff":
        raise DfreError(
            "an alpha floor applies to relative cutoff alphas (the default settings): drop "
            "the floor or use --alpha-type relative --regularization cutoff"
        )
    if alpha_floor == "auto":
        floors = {a: spectra[a].noise_ratio for a in sources}
    else:
        try:
            value = float(alpha_floor)
        except (TypeError, ValueError):
            raise DfreError(
                f"alpha floor {alpha_floor!r}: give 'auto', 'none' or a relative cutoff in [0, 1)"
            ) from None
        if not 0 <= value < 1:
            raise DfreError(f"alpha floor {value}: a relative cutoff lies in [0, 1)")
        floors = dict.fromkeys(sources, value)
    top = max(settings.alphas)
    return {a: float(min(f, top)) for a, f in floors.items()}


def _source_settings(settings: RidgeSettings, floors: dict[int, float], sources):
    """The settings of every source, its alphas raised to its floor (if any)."""
    out = {}
    for a in sources:
        if a in floors:
            alphas = tuple(float(max(al, floors[a])) for al in settings.alphas)
            out[a] = RidgeSettings(
                alphas, settings.alpha_type, settings.regularization_method, settings.scoring
            )
        else:
            out[a] = settings
    return out


def _unresolved(spectra, settings: dict, sources) -> list[int]:
    """Sources whose spectrum the Gram pass cannot resolve as deep as their cutoffs go."""
    out = []
    for a in sources:
        st = settings[a]
        relative_cutoff = st.alpha_type == "relative" and st.regularization_method == "cutoff"
        if not spectra[a].resolved(min(st.alphas) if relative_cutoff else None):
            out.append(a)
    return out


# ---------------------------------------------------------------------- public API
def gfre_matrix(
    features: Mapping[str, Any] | Sequence[Any],
    selection: Any,
    *,
    names: Sequence[str] | None = None,
    store: Any = None,
    solver: str = "auto",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    alpha_type: str = "relative",
    regularization_method: str = "cutoff",
    scoring: str = "neg_root_mean_squared_error",
    random_state: int | None = RANDOM_STATE,
    shuffle: bool = True,
    pointwise: bool = True,
    distortion: bool = False,
    pairs: Sequence[tuple[int, int]] | None = None,
    alpha_floor: str | float | None = None,
    describe: Any = None,
    row_name: str = "environments",
) -> GfreResult:
    """GFRE of every source→target pair of ``features`` from one pass over the rows.

    Parameters
    ----------
    features : arrays (numpy, CuPy, dask; rows = environments) as a list or a
        name→array mapping, or feature-set names of ``store``.
    selection : a :class:`dfre.data.selection.Selection` (one or K folds) or a
        ``(train_rows, test_rows)`` pair.
    solver : ``"auto"`` (default: Gram pass, plus the exact TSQR pass when a source's
        spectrum needs it), ``"gram"`` (normal equations only) or ``"tsqr"`` (QR tree
        only); see the module docstring.
    alphas, alpha_type, regularization_method, scoring, random_state, shuffle :
        the settings of skmatter's ``Ridge2FoldCV`` (defaults = skmatter's GFRE).
    pointwise : per-environment error norms (default; a second pass over the test rows
        only), from which the error bars and tail diagnostics come; the matrix is then
        ``sqrt(mean(pointwise**2))`` over all test rows.
    distortion : also compute the GFRD (skmatter's global reconstruction distortion) of
        the pairs whose target is at least as wide as the source.
    pairs : restrict to these (source, target) index pairs (default: all M×M).
    alpha_floor : ``None`` (skmatter's grid, the paper's protocol), ``"auto"`` (no relative
        cutoff below the source's storage noise floor, :mod:`dfre.linalg.spectrum`) or a
        relative cutoff every alpha is raised to.
    describe : ``describe(rows)`` → a dict per row naming the environment (structure,
        atom, element, subset), used for the diagnostics of flagged entries.
    row_name : what a row is, in the sanity warnings (``"structures"`` for descriptors).

    Returns a :class:`GfreResult`; entries of pairs not computed are NaN.
    """
    if solver not in SOLVERS:
        raise DfreError(f"unknown solver '{solver}': use one of {', '.join(SOLVERS)}")
    settings = RidgeSettings(
        tuple(float(a) for a in alphas), alpha_type, regularization_method, scoring
    )
    names, arrays = feature_arrays(features, store=store, names=names)
    n_rows = arrays[0].shape[0]
    dims = [a.shape[1] for a in arrays]
    bounds = np.cumsum([0, *dims])
    slices = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    m = len(arrays)
    pairs = [(a, b) for a in range(m) for b in range(m)] if pairs is None else list(pairs)
    sources = sorted({a for a, _ in pairs})
    dist_pairs = [(a, b) for a, b in pairs if dims[b] >= dims[a]] if distortion else []
    folds = _folds_of(selection)
    labels = fold_labels(folds, n_rows, random_state=random_state, shuffle=shuffle)
    fold_groups = [
        (GROUPS_PER_FOLD * k + FOLD1, GROUPS_PER_FOLD * k + FOLD2) for k in range(len(folds))
    ]
    dtypes = [a.dtype for a in arrays]

    Z = _concatenate(arrays)
    pass_solver = "tsqr" if solver == "tsqr" else "gram"
    with progress.phase(
        f"GFRE statistics pass over {n_rows:,} rows ({m} feature sets, {len(folds)} fold(s))"
    ):
        stats = group_statistics(Z, labels, GROUPS_PER_FOLD, solver=pass_solver)
    _check_finite(stats, names, slices)
    spectra = set_spectra(stats, names, slices, dtypes, fold_groups)
    floors = _alpha_floors(alpha_floor, spectra, settings, sources)
    source_settings = _source_settings(settings, floors, sources)
    exact_for = _unresolved(spectra, source_settings, sources) if solver == "auto" else []
    if exact_for:
        with progress.phase(
            f"GFRE exact (TSQR) pass: the spectra of {', '.join(names[a] for a in exact_for)} "
            "reach below what the normal equations resolve"
        ):
            stats = group_statistics(Z, labels, GROUPS_PER_FOLD, solver="tsqr")
        spectra = set_spectra(stats, names, slices, dtypes, fold_groups)
    models = []
    with progress.phase(
        f"GFRE ridge fits of {len(pairs)} pairs", total=len(folds), unit="fold(s)"
    ) as step:
        for k in range(len(folds)):
            models.append(_fit_fold(stats, k, names, slices, source_settings, pairs, dist_pairs))
            step.advance()

    matrix = np.full((m, m), np.nan)
    alpha = np.full((m, m), np.nan)
    dist = np.full((m, m), np.nan) if distortion else None
    n_test = sum(md.n_test for md in models)
    for a, b in pairs:
        matrix[a, b] = np.sqrt(sum(md.residual[a, b] for md in models) / n_test)
        alpha[a, b] = models[0].alpha[a, b]
    if distortion:
        for a, b in dist_pairs:
            dist[a, b] = np.sqrt(sum(md.distortion[a, b] for md in models) / n_test)
    test_rows = np.concatenate([np.flatnonzero(labels[k] == TEST) for k in range(len(folds))])
    result = GfreResult(
        names,
        matrix,
        alpha,
        _cka(stats, slices),
        test_rows,
        distortion=dist,
        config={
            "solver": solver,
            "solver_used": stats.kind,
            "exact_path_for": [names[a] for a in exact_for],
            "alphas": list(settings.alphas),
            "alpha_type": alpha_type,
            "regularization_method": regularization_method,
            "scoring": scoring,
            "random_state": None if random_state is None else int(random_state),
            "shuffle": shuffle,
            "n_folds": len(folds),
            "alpha_floor": _floor_config(alpha_floor, floors, names),
        },
        selection=selection,
        spectra=spectra,
    )
    if pointwise:
        with progress.phase(f"GFRE pointwise errors of {len(test_rows):,} test rows"):
            pw, pd = _pointwise_pass(Z, labels, models, slices, pairs, m, dist_pairs)
        result.pointwise = pw
        result.pointwise_distortion = pd
        with np.errstate(invalid="ignore"):
            result.matrix = np.sqrt(np.mean(pw**2, axis=2))
            if dist_pairs:
                result.distortion = np.sqrt(np.mean(pd**2, axis=2))
        result.error = bootstrap_standard_error(pw)
    result.diagnostics = diagnose(
        names,
        result.matrix,
        result.pointwise,
        test_rows,
        error=result.error,
        warnings=selection_warnings(names, dims, folds, sources, rows=row_name),
        feature_sets={sp.name: sp.to_json() for sp in spectra},
        describe=describe,
    )
    result.config["diagnostics"] = result.diagnostics.to_json()
    return result


def _floor_config(alpha_floor, floors: dict[int, float], names) -> dict | None:
    if not floors:
        return None
    return {"mode": str(alpha_floor), "relative": {names[a]: f for a, f in floors.items()}}


# ---------------------------------------------------------------------- store
@writes_store("dfre gfre")
def gfre_store(
    store: Any,
    names: Sequence[str],
    selection: Any = "stratified:1000",
    *,
    run: str = "gfre",
    seed: int = 0,
    solver: str = "auto",
    pointwise: bool = True,
    **options: Any,
) -> GfreResult:
    """GFRE matrix of the feature sets ``names`` of ``store``, written to ``results/<run>``.

    ``selection`` is a spec (``stratified:N``, ``random:N``, ``structure:N``, ``kfold:K``)
    built over the rows valid in every feature set, or a ready
    :class:`~dfre.data.selection.Selection`. ``options`` go to :func:`gfre_matrix`.
    The store is written only after everything was computed.
    """
    from dfre.data.selection import selection_for_store
    from dfre.store import Store, check_run_name

    check_run_name(run)  # before any work
    st = store if isinstance(store, Store) else Store.open(store, mode="r+")
    names = list(names)
    if len(names) < 2:
        raise DfreError(f"give at least two feature sets to compare (got {names})")
    if len(set(names)) != len(names):
        raise DfreError(f"feature sets are repeated in {names}: give each once")
    arrays = [st.features(name) for name in names]  # unknown names raise here
    if isinstance(selection, str):
        selection = selection_for_store(selection, st, seed=seed, valid=st.valid_rows(names))
    result = gfre_matrix(
        arrays,
        selection,
        names=names,
        solver=solver,
        pointwise=pointwise,
        describe=lambda rows: describe_rows(st, rows),
        **options,
    )
    result.config.update({"seed": seed, "pointwise": pointwise})
    write_result(st, run, result)
    return result


@writes_store("dfre gfre")
def write_result(store: Any, run: str, result: GfreResult) -> None:
    """Write ``result`` into ``results/<run>`` of ``store`` (the results contract)."""
    if not store.writable:
        from dfre.store import Store

        store = Store.open(store.path, mode="r+")
    arrays = {
        "matrix": result.matrix,
        "alpha": result.alpha,
        "cka": result.cka,
        "test_rows": result.test_rows.astype(np.int64),
    }
    if result.pointwise is not None:
        arrays["pointwise"] = result.pointwise
    if result.distortion is not None:
        arrays["distortion"] = result.distortion
    arrays.update(uncertainty_arrays(result))
    store.write_run(run, "gfre", result, arrays)


# ---------------------------------------------------------------------- skmatter-compatible
def _settings_from(scaler: Any, estimator: Any) -> dict:
    """gfre_matrix keywords equivalent to skmatter's ``scaler`` and ``estimator``."""
    from skmatter.linear_model import Ridge2FoldCV
    from skmatter.preprocessing import StandardFlexibleScaler

    if scaler is not None and not (
        isinstance(scaler, StandardFlexibleScaler)
        and scaler.with_mean
        and scaler.with_std
        and not scaler.column_wise
    ):
        raise DfreError(
            "dfre reproduces skmatter's default scaler only (StandardFlexibleScaler() with "
            "with_mean, with_std, column_wise=False): call skmatter for other scalers"
        )
    if estimator is None:
        return {}
    if not isinstance(estimator, Ridge2FoldCV) or estimator.cv is not None:
        raise DfreError(
            "dfre reproduces skmatter's Ridge2FoldCV (with cv=None) only: call skmatter "
            "for other estimators"
        )
    random_state = estimator.random_state
    if random_state is not None and not isinstance(random_state, int | np.integer):
        raise DfreError("Ridge2FoldCV random_state must be an int or None for dfre")
    return {
        "alphas": tuple(np.atleast_1d(estimator.alphas).astype(float)),
        "alpha_type": estimator.alpha_type,
        "regularization_method": estimator.regularization_method,
        "scoring": estimator.scoring or "neg_mean_squared_error",
        "random_state": random_state,
        "shuffle": estimator.shuffle,
    }


def _pointwise_pair(X, Y, train_idx, test_idx, scaler, estimator, store, distortion, solver):
    _, (x, y) = feature_arrays([X, Y], store=store)
    if distortion and y.shape[1] < x.shape[1]:
        raise DfreError(
            f"the reconstruction distortion needs a target at least as wide as the source "
            f"({y.shape[1]} < {x.shape[1]} features), as in skmatter: swap source and target"
        )
    train, test = skmatter_default_split(x.shape[0], train_idx, test_idx)
    result = gfre_matrix(
        [x, y],
        (train, test),
        solver=solver,
        pointwise=True,
        distortion=distortion,
        pairs=[(0, 1)],
        **_settings_from(scaler, estimator),
    )
    values = result.pointwise_distortion if distortion else result.pointwise
    order = np.searchsorted(result.test_rows, np.asarray(test, dtype=np.int64))
    return values[0, 1, order]


def pointwise_global_reconstruction_error(
    X, Y, train_idx=None, test_idx=None, scaler=None, estimator=None, *, store=None, solver="auto"
):
    """skmatter's ``pointwise_global_reconstruction_error``: :math:`\\|y_i - x_i W\\|` for
    every test row (in the order of ``test_idx``), computed by :func:`gfre_matrix`.

    ``X`` and ``Y`` are numpy, CuPy or dask arrays (e.g. ``store.features(name)``), or
    feature-set names of ``store``. Only skmatter's default scaler and ``Ridge2FoldCV``
    estimators are supported. ``solver`` is that of :func:`gfre_matrix`: the default
    ``"auto"`` takes the exact (TSQR) path whenever the Gram pass cannot reproduce
    skmatter's SVD path.
    """
    return _pointwise_pair(X, Y, train_idx, test_idx, scaler, estimator, store, False, solver)


def global_reconstruction_error(
    X, Y, test_idx=None, train_idx=None, scaler=None, estimator=None, *, store=None, solver="auto"
):
    """skmatter's ``global_reconstruction_error``:
    :math:`\\sqrt{\\frac{1}{n_{test}}\\sum_i \\|y_i - x_i W\\|^2}` (see
    :func:`pointwise_global_reconstruction_error`)."""
    values = _pointwise_pair(X, Y, train_idx, test_idx, scaler, estimator, store, False, solver)
    return np.linalg.norm(values) / np.sqrt(len(values))


def pointwise_global_reconstruction_distortion(
    X, Y, test_idx=None, train_idx=None, scaler=None, estimator=None, *, store=None, solver="auto"
):
    """skmatter's ``pointwise_global_reconstruction_distortion``:
    :math:`\\|x_i W - x_i \\Omega\\|` with :math:`\\Omega` the orthogonal (Procrustes)
    map fitted from the train rows to their ridge predictions (needs ``Y`` at least as
    wide as ``X``, as in skmatter)."""
    return _pointwise_pair(X, Y, train_idx, test_idx, scaler, estimator, store, True, solver)


def global_reconstruction_distortion(
    X, Y, test_idx=None, train_idx=None, scaler=None, estimator=None, *, store=None, solver="auto"
):
    """skmatter's ``global_reconstruction_distortion``: RMS over the test rows of
    :func:`pointwise_global_reconstruction_distortion`."""
    values = _pointwise_pair(X, Y, train_idx, test_idx, scaler, estimator, store, True, solver)
    return np.linalg.norm(values) / np.sqrt(len(values))
