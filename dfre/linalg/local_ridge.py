"""Batched local ridge: scikit-matter's ``Ridge2FoldCV`` on many neighbourhoods at once.

For each query :math:`x` with its ``k`` neighbours :math:`X` (k, d) in the source space
and :math:`Y` (k, d') in the target space, scikit-matter's local reconstruction centres
the neighbourhood, :math:`X_c = X - \\bar x`, :math:`Y_c = Y - \\bar y`, fits
``Ridge2FoldCV(alphas=geomspace(1e-9, 0.9, 20), alpha_type="relative",
regularization_method="cutoff", scoring="neg_root_mean_squared_error")`` on
:math:`(X_c, Y_c)` and predicts :math:`\\hat y = \\bar y + (x - \\bar x) P`.

``Ridge2FoldCV`` splits the k rows with ``KFold(2, shuffle=True, random_state)`` -- the
same positions for every neighbourhood of the same k -- into folds 1 and 2 with SVDs
:math:`X_f = U_f S_f V_f^T`. With the scaled threshold
:math:`t_a = \\alpha_a \\max(s_{1,\\max}, s_{2,\\max})` the prediction of fold 2 from
fold 1 keeps the singular values :math:`s > \\max(t_a, r)`,
:math:`r = \\max(k, d)\\,\\epsilon`:

.. math::

    \\hat Y_2(a) = X_2 V_1 \\,\\mathrm{diag}(1/s_1)_{kept}\\, U_1^T Y_1,

scored by the negative per-column RMSE averaged over columns, and vice versa; the
first alpha with the best mean score of both directions is refitted on all k rows
(keeping :math:`s > t_a`) and applied to :math:`x - \\bar x`.

Here every neighbourhood of a block is solved together. The fast path works with the
kernel :math:`K = X_c X_c^T` (k, k): a batched ``eigh`` of its fold blocks
:math:`K_{ff} = U_f S_f^2 U_f^T` gives the same :math:`s_f, U_f`, and
:math:`X_2 V_1 S_1^{-1} U_1^T = K_{21} U_1 S_1^{-2} U_1^T`; the refit uses
:math:`(x - \\bar x) X_c^T U S^{-2} U^T Y_c`, with the exact null direction
:math:`(1, \\dots, 1)` of the centred kernel projected out first (a plain linear solve
when every component is kept). The CV errors of all alphas come from prefix sums over the
components (:func:`_direction_scores`). An eigenvalue of a kernel is only
accurate to about :math:`k\\,\\epsilon\\,\\lambda_{\\max}`, so a neighbourhood whose
kept (or possibly kept) components include one with :math:`s < 10^{-5} s_{\\max}` is
recomputed with batched SVDs of the centred data, exactly as scikit-matter does. The
result therefore equals scikit-matter's to rounding on every neighbourhood.

Every operation uses the array module of the data (numpy or CuPy); no Python loop runs
per neighbourhood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import KFold

from dfre.linalg.backend import array_module, solve_positive_definite, thin_svd

try:  # numpy's batched Cholesky gufunc: a failed factor comes back as NaN, no exception
    from numpy.linalg._umath_linalg import cholesky_lo as _cholesky_gufunc
except ImportError:  # pragma: no cover - other numpy layouts fall back to eigvalsh
    _cholesky_gufunc = None

#: scikit-matter's default relative alphas of the reconstruction measures.
DEFAULT_ALPHAS = np.geomspace(1e-9, 0.9, 20)
#: scikit-matter's random state for the 2-fold split.
RANDOM_STATE = 0x5F3759DF
EPS = float(np.finfo(np.float64).eps)
#: Kernel eigenvalues below this fraction of the largest are not trusted (s < 1e-5 s_max):
#: their relative error may exceed about 1e-6 (absolute error ~ eps * lambda_max).
RELIABLE_EIGENVALUE = 1e-10
#: Absolute eigenvalue error of the kernel path, in units of k * eps * lambda_max.
EIGH_NOISE = 10.0


@dataclass
class LocalRidgeResult:
    """Predictions (b, d'), chosen relative alphas (b,), neighbourhoods solved by SVD."""

    prediction: object
    alpha: object
    n_exact: int


def fold_positions(k: int, random_state: int = RANDOM_STATE) -> tuple[np.ndarray, np.ndarray]:
    """The (fold 1, fold 2) neighbour positions ``Ridge2FoldCV`` uses for k rows."""
    cv = KFold(n_splits=2, shuffle=True, random_state=random_state)
    fold1, fold2 = next(cv.split(np.empty((k, 1))))
    return fold1, fold2


def _descending(w, v, rank: int):
    """eigh output (ascending) as the ``rank`` largest, descending (contiguous for BLAS)."""
    xp = array_module(w)
    return (
        xp.ascontiguousarray(w[..., ::-1][..., :rank]),
        xp.ascontiguousarray(v[..., ::-1][..., :rank]),
    )


def _neg_rmse(y, pred):
    """Negative RMSE per column averaged over the columns, for every batch item."""
    xp = array_module(y)
    return -xp.sqrt(xp.mean((y - pred) ** 2, axis=1)).mean(axis=1)


def _direct_scores(a, b, s, denom, y_held, thresholds, rcond):
    """Scores (batch, n_alphas) of predicting ``y_held`` by ``a diag(kept/denom) b``.

    A component is kept for alpha ``j`` where ``s > thresholds[:, j]`` and ``s > rcond``.
    Alphas that keep the same number of components as the previous alpha reuse its
    score (the kept set is a prefix, so the prediction is the same).
    """
    xp = array_module(a)
    n_batch, n_alphas = thresholds.shape
    scores = xp.empty((n_batch, n_alphas))
    positive = xp.where(denom > 0, denom, 1.0)
    counts_prev = None
    for j in range(n_alphas):
        keep = (s > thresholds[:, j : j + 1]) & (s > rcond)
        counts = keep.sum(axis=1)
        todo = xp.arange(n_batch) if counts_prev is None else xp.nonzero(counts != counts_prev)[0]
        if counts_prev is not None:
            scores[:, j] = scores[:, j - 1]
        if len(todo):
            weights = xp.where(keep[todo], 1.0 / positive[todo], 0.0)
            pred = (a[todo] * weights[:, None, :]) @ b[todo]
            scores[todo, j] = _neg_rmse(y_held[todo], pred)
        counts_prev = counts
    return scores


def _direction_scores(a, b, s, denom, y_held, thresholds, rcond, groups):
    """Scores (T, batch, n_alphas) of predicting ``y_held`` by ``a diag(kept/denom) b``.

    ``y_held`` holds the columns of T targets side by side, target t in ``groups[t]``
    (a slice), so one set of products serves them all. The kept components are a prefix
    of length :math:`n_j` (``s`` is descending), so with
    :math:`W = \\mathrm{diag}(1/denom) b`, :math:`G = a^T a` and per target column c

    .. math::

        \\|y_c - a_{:n} W_{:n,c}\\|^2 = \\|y_c\\|^2 - 2 \\sum_{j<n} (a^T y)_{jc} W_{jc}
            + \\sum_{j<n} W_{jc} (L W)_{jc}, \\quad L = G_{\\mathrm{diag}} + 2 G_{\\mathrm{lower}},

    prefix sums that give every alpha's error for the price of one prediction. The prefix
    sums at the alphas' :math:`n_j` are one batched product with the 0/1 matrix
    :math:`M_{jl} = [l < n_j]` (BLAS, far faster than a cumulative sum over the middle
    axis). A target's score is minus the mean over its columns of the column RMSEs. Where
    an error is below :math:`10^{-6}` of the terms it cancels, the expansion has lost
    digits, and those items are scored directly (:func:`_direct_scores`).
    """
    xp = array_module(a)
    n_held = y_held.shape[1]
    rank = s.shape[1]
    keep_base = s > rcond
    w = xp.where(keep_base, 1.0 / xp.where(denom > 0, denom, 1.0), 0.0)[:, :, None] * b
    gram = a.transpose(0, 2, 1) @ a
    factor = 2.0 * xp.tri(rank, k=-1) + xp.eye(rank)
    quad_terms = w * ((gram * factor[None]) @ w)
    cross_terms = (a.transpose(0, 2, 1) @ y_held) * w
    counts = ((s[:, None, :] > thresholds[:, :, None]) & keep_base[:, None, :]).sum(axis=2)
    prefix = (xp.arange(rank)[None, None, :] < counts[:, :, None]).astype(xp.float64)
    quad_n = prefix @ quad_terms
    cross_n = prefix @ cross_terms
    norms = xp.sum(y_held**2, axis=1)[:, None, :]
    sse = norms - 2.0 * cross_n + quad_n
    rmse = xp.sqrt(xp.maximum(sse, 0.0) / n_held)
    lost = sse < 1e-6 * xp.maximum(norms, quad_n)
    scores = xp.empty((len(groups), *thresholds.shape))
    for t, cols in enumerate(groups):
        scores[t] = -rmse[:, :, cols].mean(axis=2)
        redo = xp.nonzero(lost[:, :, cols].any(axis=(1, 2)))[0]
        if len(redo):
            scores[t, redo] = _direct_scores(
                a[redo],
                b[redo][:, :, cols],
                s[redo],
                denom[redo],
                y_held[redo][:, :, cols],
                thresholds[redo],
                rcond,
            )
    return scores


def _best_alpha(a12, b1, s1, d1, a21, b2, s2, d2, y1, y2, alphas, rcond, groups, floor):
    """Index of the first best alpha (T, batch), its threshold (T, batch) and all the
    scaled thresholds (batch, n_alphas), for the T targets side by side in ``groups``.
    ``floor`` (batch,) or None: no threshold below it (the noise-aware option)."""
    xp = array_module(a12)
    scale = xp.maximum(xp.maximum(s1.max(axis=1), s2.max(axis=1)), 0.0)
    thresholds = scale[:, None] * xp.asarray(alphas)[None, :]
    if floor is not None:
        thresholds = xp.maximum(thresholds, floor[:, None])
    score12 = _direction_scores(a12, b1, s1, d1, y2, thresholds, rcond, groups)
    score21 = _direction_scores(a21, b2, s2, d2, y1, thresholds, rcond, groups)
    best = xp.argmax((score12 + score21) / 2, axis=2)
    chosen = xp.stack([xp.take_along_axis(thresholds, bt[:, None], axis=1)[:, 0] for bt in best])
    return best, chosen, thresholds, scale


def _side_by_side(ycs):
    """The targets' columns concatenated, and the slice of each target."""
    xp = array_module(ycs[0])
    edges = np.cumsum([0, *[y.shape[2] for y in ycs]])
    groups = [slice(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return (ycs[0] if len(ycs) == 1 else xp.concatenate(ycs, axis=2)), groups


def _unreliable(lam, threshold, k):
    """Items whose kernel eigenvalues near or above ``threshold**2`` are not trustworthy."""
    xp = array_module(lam)
    lam_max = xp.maximum(lam[:, :1], 0.0)
    noise = EIGH_NOISE * k * EPS * lam_max
    doubtful = lam < RELIABLE_EIGENVALUE * lam_max
    maybe_kept = lam + noise > threshold[:, None] ** 2
    return (doubtful & maybe_kept).any(axis=1)


def _ones_reflector(k: int, xp):
    """Householder vector w and factor c of H = I - c w w^T, H (1, ..., 1)/sqrt(k) = e_1.

    Made on the host (c needs no device synchronisation) and moved to ``xp``.
    """
    w = np.full(k, 1.0 / np.sqrt(k))
    w[0] -= 1.0
    return xp.asarray(w), 2.0 / float(w @ w)


def _reflect_kernel(kern):
    """(H K H)[1:, 1:]: the kernel in an orthonormal basis of the complement of ones."""
    xp = array_module(kern)
    w, c = _ones_reflector(kern.shape[1], xp)
    kw = kern @ w  # (b, k); K is symmetric
    wkw = kw @ w  # (b,)
    kw = kw[:, 1:] - (0.5 * c * wkw)[:, None] * w[None, 1:]  # folds the w K w term in
    reflected = kern[:, 1:, 1:].copy()
    reflected -= c * kw[:, :, None] * w[None, None, 1:]
    reflected -= c * w[None, 1:, None] * kw[:, None, :]
    return reflected


def _unreflect(v):
    """H [0, v] for a batch of vectors v (b, k-1): back to the k neighbour positions."""
    xp = array_module(v)
    full = xp.concatenate([xp.zeros((v.shape[0], 1)), v], axis=1)
    w, c = _ones_reflector(full.shape[1], xp)
    return full - c * (full @ w)[:, None] * w[None, :]


def _vector_times(v, m):
    """Batched row vector times matrix: (b, n) x (b, n, p) -> (b, p)."""
    return (v[:, None, :] @ m)[:, 0]


def _cholesky_succeeds(matrices):
    """Which symmetric matrices of a batch a Cholesky factorisation accepts (b,) bool.

    Success proves (backward stability) that every eigenvalue of the matrix is above
    minus a rounding term of order :math:`n\\,\\epsilon\\,\\|M\\|`. numpy's batched
    ``cholesky`` raises for the whole batch when one matrix fails; its gufunc fills a
    failed factor with NaN instead, which gives the answer per matrix. CuPy's batched
    factorisation does not report failures per matrix, so there the smallest eigenvalue
    decides (``eigvalsh``, several times slower).
    """
    xp = array_module(matrices)
    if xp is np and _cholesky_gufunc is not None:
        with np.errstate(invalid="ignore"):
            factors = _cholesky_gufunc(matrices, signature="d->d")
        return np.isfinite(factors[:, -1, -1])
    return xp.linalg.eigvalsh(matrices)[:, 0] > 0


def _refit(kr, kq_r, thresholds, all_kept_likely, d, k, top):
    """Refit on all k rows in the complement of ones, for every target.

    ``kr`` (b, k-1, k-1) is the reflected kernel, ``kq_r`` (b, k-1) the reflected kernel
    column of the query, ``thresholds`` (T, b) the chosen cutoff per target, ``top`` (b,)
    an upper bound of the largest eigenvalue. Returns, per
    target, the coefficients g (b, k-1) with prediction :math:`g^T Y_c`,
    :math:`g = U \\mathrm{diag}(kept/\\lambda) U^T k_q`, and which items are not accurate
    enough (see :func:`_unreliable`). Items expected to keep every component (best alpha
    the smallest for all targets) first try a certificate: a Cholesky factorisation of
    :math:`K - f I`, with :math:`f` the largest squared threshold (or the reliability
    floor :math:`10^{-10}` ``top``) plus the rounding noise, succeeds only if every
    eigenvalue is above the cutoff; then :math:`g = K^{-1} k_q` by a linear solve. Both
    cost a fraction of the eigendecomposition the other items take.
    """
    xp = array_module(kr)
    n_batch, size = kq_r.shape
    rank = min(size, d)
    coefs = [xp.empty((n_batch, size)) for _ in range(thresholds.shape[0])]
    unreliable = xp.zeros(n_batch, dtype=bool)
    need_vectors = xp.ones(n_batch, dtype=bool)
    tried = xp.nonzero(all_kept_likely)[0] if rank == size else xp.zeros(0, dtype=xp.int64)
    if len(tried):
        largest = top[tried]
        floor = xp.maximum(xp.max(thresholds[:, tried], axis=0) ** 2, RELIABLE_EIGENVALUE * largest)
        floor += EIGH_NOISE * k * EPS * largest
        shifted = kr[tried] - floor[:, None, None] * xp.eye(size)[None]
        solved = tried[_cholesky_succeeds(shifted)]
        if len(solved):
            g = solve_positive_definite(kr[solved], kq_r[solved][:, :, None])[:, :, 0]
            for coef in coefs:
                coef[solved] = g
            need_vectors[solved] = False
    rest = xp.nonzero(need_vectors)[0]
    if len(rest):
        values, vectors = _descending(*xp.linalg.eigh(kr[rest]), rank)
        projected = _vector_times(kq_r[rest], vectors)
        inverse = 1.0 / xp.where(values > 0, values, 1.0)
        s = xp.sqrt(xp.maximum(values, 0.0))
        for coef, threshold in zip(coefs, thresholds, strict=True):
            kept = xp.where(s > threshold[rest][:, None], inverse, 0.0)
            coef[rest] = _vector_times(projected * kept, vectors.transpose(0, 2, 1))
            unreliable[rest] |= _unreliable(values, threshold[rest], k)
    return coefs, unreliable


def _kernel_path(xc, ycs, q, n1, alphas, rcond, floor):
    """Kernel (eigh) solution for every target; also flags items that need the SVD path.

    The rows are in fold order: fold 1 is ``[:n1]``, fold 2 ``[n1:]``.
    """
    xp = array_module(xc)
    k, d = xc.shape[1], xc.shape[2]
    f1, f2 = slice(0, n1), slice(n1, k)
    kern = xc @ xc.transpose(0, 2, 1)
    k21 = kern[:, f2, f1]
    lam1, u1 = _descending(*xp.linalg.eigh(kern[:, f1, f1]), min(n1, d))
    lam2, u2 = _descending(*xp.linalg.eigh(kern[:, f2, f2]), min(k - n1, d))
    s1, s2 = xp.sqrt(xp.maximum(lam1, 0.0)), xp.sqrt(xp.maximum(lam2, 0.0))
    a12, a21 = k21 @ u1, k21.transpose(0, 2, 1) @ u2
    y_all, groups = _side_by_side(ycs)
    y1, y2 = y_all[:, f1], y_all[:, f2]
    b1, b2 = u1.transpose(0, 2, 1) @ y1, u2.transpose(0, 2, 1) @ y2
    bests, chosen, thresholds, scale = _best_alpha(
        a12, b1, s1, lam1, a21, b2, s2, lam2, y1, y2, alphas, rcond, groups, floor
    )
    smallest = xp.maximum(thresholds.min(axis=1), rcond)
    # The centred rows sum to zero: the ones direction is an exact null vector of the
    # kernel (scikit-matter's SVD finds s ~ eps there, below every threshold). Working in
    # the complement of ones keeps its rounding-level eigenvalue from posing as kept.
    w, c = _ones_reflector(k, xp)
    kq = _vector_times(q, xc.transpose(0, 2, 1))
    kq_r = (kq - c * (kq @ w)[:, None] * w[None, :])[:, 1:]
    first = int(np.argmin(alphas))
    all_kept_likely = (bests == first).all(axis=0)
    # For a PSD block matrix lambda_max(K) <= lambda_max(K11) + lambda_max(K22).
    top = xp.maximum(lam1[:, 0], 0.0) + xp.maximum(lam2[:, 0], 0.0)
    coefs, redo = _refit(_reflect_kernel(kern), kq_r, chosen, all_kept_likely, d, k, top)
    predictions = [_vector_times(_unreflect(g), yc) for g, yc in zip(coefs, ycs, strict=True)]
    redo |= _unreliable(lam1, smallest, k) | _unreliable(lam2, smallest, k)
    return predictions, list(bests), redo, _relative(chosen, scale)


def _svd_path(xc, ycs, q, n1, alphas, rcond, floor):
    """scikit-matter's SVD solution for every target (batched; rows in fold order)."""
    xp = array_module(xc)
    x1, x2 = xc[:, :n1], xc[:, n1:]
    u1, s1, v1t = thin_svd(x1)
    u2, s2, v2t = thin_svd(x2)
    a12, a21 = x2 @ v1t.transpose(0, 2, 1), x1 @ v2t.transpose(0, 2, 1)
    u, s, vt = thin_svd(xc)
    q_v = _vector_times(q, vt.transpose(0, 2, 1))
    inverse = 1.0 / xp.where(s > 0, s, 1.0)
    y_all, groups = _side_by_side(ycs)
    y1, y2 = y_all[:, :n1], y_all[:, n1:]
    b1, b2 = u1.transpose(0, 2, 1) @ y1, u2.transpose(0, 2, 1) @ y2
    bests, chosen, _, scale = _best_alpha(
        a12, b1, s1, s1, a21, b2, s2, s2, y1, y2, alphas, rcond, groups, floor
    )
    predictions = []
    for yc, threshold in zip(ycs, chosen, strict=True):
        coef = q_v * xp.where(s > threshold[:, None], inverse, 0.0)
        predictions.append(_vector_times(_vector_times(coef, u.transpose(0, 2, 1)), yc))
    return predictions, list(bests), _relative(chosen, scale)


def _relative(chosen, scale):
    """Chosen thresholds (T, b) relative to the scale of the alphas, max(s_1, s_2) (b,)."""
    xp = array_module(chosen)
    return chosen / xp.where(scale > 0, scale, 1.0)[None, :]


def local_ridge(
    x_neighbours,
    y_neighbours,
    x_query,
    alphas=DEFAULT_ALPHAS,
    *,
    method: str = "auto",
    fold_ordered: bool = False,
    floor=None,
):
    """Local ridge predictions of one or several targets for a batch of queries.

    ``x_neighbours`` (b, k, d) are the source neighbourhoods of the b queries ``x_query``
    (b, d); ``y_neighbours`` (b, k, d') the target rows of the same neighbours, or a list
    of such arrays for several targets (the source decompositions are shared). All are
    scaled; they are used in float64. ``method`` is ``"auto"`` (kernel path, SVD where
    the kernel is not accurate enough), ``"svd"`` or ``"kernel"`` (no fallback; for
    measurements only). ``fold_ordered`` says the k neighbours are already given in fold
    order (the positions of :func:`fold_positions` fold 1, then fold 2), as a caller
    gathering them can arrange for free. ``floor`` (b,) is an optional smallest cutoff per
    neighbourhood (in singular-value units of the scaled rows): no threshold of the alpha
    grid goes below it, and the reported alpha is then the effective relative cutoff.
    Returns a :class:`LocalRidgeResult` per target (a list when a list was given) whose
    ``prediction`` is :math:`\\bar y + (x - \\bar x) P`.
    """
    several = isinstance(y_neighbours, list | tuple)
    ys = list(y_neighbours) if several else [y_neighbours]
    xp = array_module(x_neighbours)
    alphas = np.asarray(alphas, dtype=np.float64)
    x_neighbours = xp.asarray(x_neighbours, dtype=xp.float64)
    ys = [xp.asarray(y, dtype=xp.float64) for y in ys]
    n_batch, k, d = x_neighbours.shape
    fold1, fold2 = fold_positions(k)
    n1 = len(fold1)
    if not fold_ordered:
        # fold order (fold 1, then fold 2) makes every fold block a slice; the fit does
        # not depend on the order of its rows
        order = xp.asarray(np.concatenate([fold1, fold2]))
        x_neighbours = x_neighbours[:, order]
        ys = [y[:, order] for y in ys]
    xm = x_neighbours.mean(axis=1)
    xc = x_neighbours - xm[:, None]
    yms = [y.mean(axis=1) for y in ys]
    ycs = [y - ym[:, None] for y, ym in zip(ys, yms, strict=True)]
    q = xp.asarray(x_query, dtype=xp.float64) - xm
    rcond = max(k, d) * EPS
    floor = None if floor is None else xp.asarray(floor, dtype=xp.float64)
    if method == "svd":
        centred, bests, chosen = _svd_path(xc, ycs, q, n1, alphas, rcond, floor)
        n_exact = n_batch
    else:
        centred, bests, redo, chosen = _kernel_path(xc, ycs, q, n1, alphas, rcond, floor)
        redo = xp.nonzero(redo)[0] if method == "auto" else redo[:0]
        n_exact = int(len(redo))
        if n_exact:
            exact, exact_best, exact_chosen = _svd_path(
                xc[redo],
                [yc[redo] for yc in ycs],
                q[redo],
                n1,
                alphas,
                rcond,
                None if floor is None else floor[redo],
            )
            for t in range(len(ycs)):
                centred[t][redo], bests[t][redo] = exact[t], exact_best[t]
                chosen[t][redo] = exact_chosen[t]
    alphas_xp = xp.asarray(alphas)
    if floor is None:
        chosen_alphas = [alphas_xp[best] for best in bests]
    else:  # the effective relative cutoff: threshold / max singular value of the folds
        chosen_alphas = list(chosen)
    results = [
        LocalRidgeResult(ym + c, alpha, n_exact)
        for ym, c, alpha in zip(yms, centred, chosen_alphas, strict=True)
    ]
    return results if several else results[0]
