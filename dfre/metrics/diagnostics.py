"""What a reconstruction error rests on: per-entry diagnostics, flags and sanity warnings.

For every computed source→target entry with pointwise errors :math:`e_i` over the
:math:`n` test environments (:math:`E^2 = \\frac1n \\sum_i e_i^2`):

* ``tail_share``: the share of :math:`\\sum_i e_i^2` carried by the worst 1 % of the
  test environments (at least one). Near 0.01–0.05 for light-tailed errors; near 1 when
  a handful of environments decide the value;
* ``median`` and ``p95``: the median and 95th percentile of :math:`e_i`;
* a **flag** when :math:`E > 1` (worse than predicting the train mean: the scaled
  target has unit total variance) or when ``tail_share`` exceeds :data:`TAIL_FLAG` and
  :math:`E` is at least :data:`NEGLIGIBLE` (a self-reconstruction at rounding level has
  some tail, and no meaning);
  a flagged entry names its worst environments (row and, for a store, structure, atom,
  element and subset) so they can be opened, e.g. in the chemiscope export.

**Sanity warnings** (one line each) catch selections under which the numbers mean
little: fewer train rows than source features (an underdetermined map), a test share
above 50 %, and (LFRE) as many neighbours as train rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Share of the test environments whose errors make up the tail.
TAIL_FRACTION = 0.01
#: Flag an entry whose worst 1 % carry more than this share of the squared error.
TAIL_FLAG = 0.5
#: Errors below this (1e-3 of the target's scale) are not flagged for their tail.
NEGLIGIBLE = 1e-3
#: At most this many environments are named per flagged entry.
MAX_NAMED = 10


@dataclass
class Diagnostics:
    """Diagnostics of one result: per-entry arrays, flags, warnings, feature-set spectra."""

    tail_share: np.ndarray  # (M, M)
    median: np.ndarray  # (M, M)
    p95: np.ndarray  # (M, M)
    flags: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    feature_sets: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "tail_fraction": TAIL_FRACTION,
            "tail_flag": TAIL_FLAG,
            "flags": self.flags,
            "warnings": self.warnings,
            "feature_sets": self.feature_sets,
        }


def tail_share(squares: np.ndarray, fraction: float = TAIL_FRACTION) -> np.ndarray:
    """Share of the sum over the last axis carried by its largest ``ceil(fraction n)`` values."""
    n = squares.shape[-1]
    top = max(1, int(np.ceil(fraction * n)))
    largest = -np.partition(-squares, top - 1, axis=-1)[..., :top]
    total = squares.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, largest.sum(axis=-1) / total, 0.0)


def entry_statistics(pointwise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``tail_share``, ``median`` and ``p95`` (each (M, M)) of pointwise errors (M, M, n)."""
    m = pointwise.shape[:2]
    share, median, p95 = (np.full(m, np.nan) for _ in range(3))
    done = np.isfinite(pointwise).all(axis=2) & (pointwise.shape[2] > 0)
    if done.any():
        values = pointwise[done]
        share[done] = tail_share(values**2)
        median[done] = np.median(values, axis=1)
        p95[done] = np.percentile(values, 95, axis=1)
    return share, median, p95


def describe_rows(store: Any, rows: np.ndarray, level: str = "atoms") -> list[dict]:
    """Where ``rows`` of a store's per-atom (or per-structure) arrays come from."""
    from ase.data import chemical_symbols

    rows = np.asarray(rows, dtype=np.int64)
    subsets = store.subsets()
    if level == "structures":
        return [{"structure": int(r), "subset": str(subsets[r])} for r in rows]
    offsets = store.offsets
    numbers = store.numbers()
    structures = np.searchsorted(offsets, rows, side="right") - 1
    return [
        {
            "structure": int(s),
            "atom": int(r - offsets[s]),
            "element": chemical_symbols[int(numbers[r])],
            "subset": str(subsets[s]),
        }
        for r, s in zip(rows, structures, strict=True)
    ]


def _flag(value: float, share: float) -> list[str]:
    reasons = []
    if value > 1:
        reasons.append("above 1: worse than predicting the mean of the target")
    if share > TAIL_FLAG and value >= NEGLIGIBLE:
        reasons.append(
            f"the worst {TAIL_FRACTION:.0%} of the test environments carry {share:.0%} of the "
            "squared error"
        )
    return reasons


def diagnose(
    names: Sequence[str],
    matrix: np.ndarray,
    pointwise: np.ndarray | None,
    test_rows: np.ndarray,
    *,
    error: np.ndarray | None = None,
    warnings: Sequence[str] = (),
    feature_sets: dict | None = None,
    describe=None,
) -> Diagnostics:
    """Diagnostics of a result; ``describe(rows)`` names environments (e.g. from a store)."""
    m = len(names)
    if pointwise is None:
        nan = np.full((m, m), np.nan)
        diag = Diagnostics(nan, nan.copy(), nan.copy())
    else:
        diag = Diagnostics(*entry_statistics(pointwise))
    diag.warnings = list(warnings)
    diag.feature_sets = dict(feature_sets or {})
    for a in range(m):
        for b in range(m):
            value = matrix[a, b]
            if not np.isfinite(value):
                continue
            share = diag.tail_share[a, b]
            reasons = _flag(float(value), float(share) if np.isfinite(share) else 0.0)
            if not reasons:
                continue
            entry = {
                "source": names[a],
                "target": names[b],
                "value": float(value),
                "error": None if error is None else float(error[a, b]),
                "reasons": reasons,
                "environments": [],
            }
            if pointwise is not None and np.isfinite(pointwise[a, b]).all():
                errors = pointwise[a, b]
                n_tail = max(1, int(np.ceil(TAIL_FRACTION * len(errors))))
                worst = np.argsort(-errors, kind="stable")[: min(n_tail, MAX_NAMED)]
                total = float(np.sum(errors**2))
                where = describe(test_rows[worst]) if describe else [{} for _ in worst]
                entry["environments"] = [
                    {
                        "row": int(test_rows[i]),
                        "error": float(errors[i]),
                        "share": float(errors[i] ** 2 / total) if total > 0 else 0.0,
                        **info,
                    }
                    for i, info in zip(worst, where, strict=True)
                ]
            diag.flags.append(entry)
    return diag


def selection_warnings(
    names: Sequence[str],
    dims: Sequence[int],
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    sources: Sequence[int],
    *,
    k: np.ndarray | None = None,
    rows: str = "environments",
) -> list[str]:
    """One-line warnings about a selection the numbers cannot rest on."""
    out = []
    n_train = min(len(train) for train, _ in folds)
    for a in sources:
        if n_train < dims[a]:
            out.append(
                f"{names[a]} has {dims[a]} features but only {n_train} train {rows}: its maps "
                f"are underdetermined (the CV keeps at most {n_train} directions); select more "
                f"{rows} or use fewer features"
            )
    # The fold with the largest test share; one row over half is rounding (kfold:2 of an
    # odd number of rows), not a test set larger than the train set.
    train, test = max(folds, key=lambda fold: len(fold[1]) / (len(fold[0]) + len(fold[1])))
    if len(test) > len(train) + 1:
        share = len(test) / (len(train) + len(test))
        out.append(
            f"the test set is {share:.0%} of the selected {rows} ({len(test)} test, "
            f"{len(train)} train): the maps are fitted on fewer rows than they are tested on; "
            "choose a smaller test set"
        )
    if k is not None and (k > 0).any() and int(k.max()) >= n_train:
        out.append(
            f"k = {int(k.max())} neighbours is at or above the {n_train} train {rows} of a "
            "fold: every neighbourhood is the whole train set (LFRE = a global fit); lower k "
            "or select more train rows"
        )
    return out
