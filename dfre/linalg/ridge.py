"""skmatter's ``Ridge2FoldCV`` computed from data factors instead of data rows.

For rows :math:`X = Q F_x`, :math:`Y = Q F_y` with orthonormal :math:`Q` (a QR factor, or
any :math:`F` with :math:`F^TF` equal to the Gram matrix of :math:`[X\\,Y]`), the thin SVD
:math:`F_x = U_F S V^T` gives the SVD of :math:`X` with :math:`U = Q U_F`, so

.. math::

    U^T Y = U_F^T F_y, \\qquad
    \\|Y_2 - X_2 W\\|_{col\\,j} = \\|F_{y,2} - F_{x,2} W\\|_{col\\,j}.

This reproduces every step of ``skmatter.linear_model.Ridge2FoldCV``: the train rows are
split into two folds; each fold's SVD keeps the singular values above
``rcond = max(n_train, d) * eps``; relative alphas are scaled by the largest singular
value of the two folds; for ``"cutoff"`` a fold keeps the singular values above
:math:`\\alpha`, :math:`W_1 = V_1 S_1^{-1} U_1^T Y_1`, for ``"tikhonov"``
:math:`W_1 = V_1 S_1 (S_1^2 + \\alpha)^{-1} U_1^T Y_1`; each alpha is scored by the mean
over the two folds of the held-out score (sklearn's RMSE scorer averages the RMSEs of the
target columns, hence per-column residual norms); the first alpha with the best score
wins and the refit on all train rows uses the same scaled alpha (keeping, like skmatter,
all singular values of the train matrix before the cutoff).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dfre.errors import DfreError

EPS = np.finfo(np.float64).eps
SCORINGS = ("neg_root_mean_squared_error", "neg_mean_squared_error")


@dataclass(frozen=True)
class RidgeSettings:
    """The parameters of ``Ridge2FoldCV`` that dfre reproduces."""

    alphas: tuple[float, ...]
    alpha_type: str = "relative"
    regularization_method: str = "cutoff"
    scoring: str = "neg_root_mean_squared_error"

    def __post_init__(self):
        alphas = np.asarray(self.alphas, dtype=np.float64)
        if self.regularization_method not in ("tikhonov", "cutoff"):
            raise DfreError(
                f"regularization method {self.regularization_method!r} is not known: "
                "use 'cutoff' or 'tikhonov'"
            )
        if self.alpha_type not in ("absolute", "relative"):
            raise DfreError(
                f"alpha type {self.alpha_type!r} is not known: use 'relative' or 'absolute'"
            )
        if self.alpha_type == "relative" and (np.any(alphas < 0) or np.any(alphas >= 1)):
            raise DfreError("relative alphas must lie in [0, 1)")
        if self.scoring not in SCORINGS:
            raise DfreError(f"scoring {self.scoring!r} is not supported: use one of {SCORINGS}")


@dataclass
class FactorSVD:
    """Thin SVD ``u @ diag(s) @ vt`` of a factor block; ``s`` below the floor set to 0."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray


def factor_svd(f: np.ndarray, floor: float = 0.0, *, exact: bool = True) -> FactorSVD:
    """Thin SVD of ``f``; singular values at or below ``floor`` become 0.

    ``exact=False`` (for factors of Gram matrices, whose small singular values are
    rounding noise below ``floor`` anyway) takes it from the eigendecomposition
    :math:`f^T f = V S^2 V^T`, :math:`U = f V S^{-1}`: a few times cheaper.
    """
    if exact:
        u, s, vt = np.linalg.svd(f, full_matrices=False)
        s = np.where(s > floor, s, 0.0)
        return FactorSVD(u, s, vt)
    w, v = np.linalg.eigh(f.T @ f)
    w, v = w[::-1], v[:, ::-1]
    s = np.sqrt(np.clip(w, 0.0, None))
    s = np.where(s > floor, s, 0.0)
    u = np.divide(f @ v, s, out=np.zeros((f.shape[0], len(s))), where=s > 0)
    return FactorSVD(u, s, v.T)


@dataclass
class FoldData:
    """Source block ``x`` and target block ``y`` of a group's factor, its row count, SVD of x."""

    x: np.ndarray
    y: np.ndarray
    count: float
    svd: FactorSVD


@dataclass
class RidgeFit:
    weights: np.ndarray  # (d_x, d_y), prediction = x @ weights
    alpha: float  # the chosen alpha as given (relative or absolute)
    scaled_alpha: float
    cv_scores: np.ndarray


def _score(col_sq: np.ndarray, count: float, scoring: str) -> float:
    mse = col_sq / count
    if scoring == "neg_root_mean_squared_error":
        return -float(np.mean(np.sqrt(mse)))
    return -float(np.mean(mse))


def _held_out_scores(train: FoldData, held: FoldData, n_keep: int, scaled, settings) -> list:
    """Score of the model fitted on ``train`` on the rows of ``held``, for every alpha."""
    s = train.svd.s[:n_keep]
    uty = train.svd.u[:, :n_keep].T @ train.y
    xv = held.x @ train.svd.vt[:n_keep].T
    if settings.regularization_method == "tikhonov":
        scores = []
        for alpha in scaled:
            coef = (s / (s**2 + alpha))[:, None] * uty
            residual = held.y - xv @ coef
            scores.append(_score((residual**2).sum(axis=0), held.count, settings.scoring))
        return scores
    ks = [min(n_keep, int(np.sum(s > alpha))) for alpha in scaled]
    by_k = {}
    residual = held.y.copy()
    done = 0
    for k in sorted(set(ks)):  # residual after k components, updated block by block
        if k > done:
            residual -= xv[:, done:k] @ (uty[done:k] / s[done:k, None])
            done = k
        by_k[k] = _score((residual**2).sum(axis=0), held.count, settings.scoring)
    return [by_k[k] for k in ks]


def ridge_2fold_cv(
    fold1: FoldData, fold2: FoldData, train: FoldData, n_train: int, settings: RidgeSettings
) -> RidgeFit:
    """Choose alpha by 2-fold CV on ``fold1``/``fold2`` and refit on ``train`` (skmatter)."""
    d_x = train.x.shape[1]
    rcond = max(n_train, d_x) * EPS
    n1 = int(np.sum(fold1.svd.s > rcond))
    n2 = int(np.sum(fold2.svd.s > rcond))
    alphas = np.asarray(settings.alphas, dtype=np.float64)
    scaled = alphas.copy()
    if settings.alpha_type == "relative":
        scaled = scaled * max(np.max(fold1.svd.s), np.max(fold2.svd.s))
    s12 = _held_out_scores(fold1, fold2, n1, scaled, settings)
    s21 = _held_out_scores(fold2, fold1, n2, scaled, settings)
    cv = (np.asarray(s12) + np.asarray(s21)) / 2
    best = int(np.argmax(cv))
    alpha = scaled[best]
    s, vt = train.svd.s, train.svd.vt
    uty = train.svd.u.T @ train.y
    if settings.regularization_method == "tikhonov":
        denom = s**2 + alpha
        coef = np.divide(s, denom, out=np.zeros_like(s), where=denom > 0)[:, None] * uty
        weights = vt.T @ coef
    else:
        k = int(np.sum(s > alpha))
        weights = vt[:k].T @ (uty[:k] / s[:k, None])
    return RidgeFit(weights, float(alphas[best]), float(alpha), cv)


def procrustes_weights(x_train: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """skmatter's ``OrthogonalRegression(use_orthogonal_projector=False)`` fitted on the
    train rows and their ridge predictions, as the (d_x, d_y) block acting on ``x``.

    The source is zero-padded to ``d_y`` columns; the orthogonal map is
    :math:`\\Omega = U V^T` from the SVD of :math:`X^T (X W) = U S V^T`.
    """
    d_x, d_y = weights.shape
    if d_y < d_x:
        raise DfreError(
            f"the reconstruction distortion needs a target at least as wide as the source "
            f"({d_y} < {d_x} features), as in skmatter: swap source and target"
        )
    xw = x_train @ weights
    u, _, vt = np.linalg.svd(x_train.T @ xw, full_matrices=False)
    return u @ vt
