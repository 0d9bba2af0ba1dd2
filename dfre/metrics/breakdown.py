"""Which environments one feature set cannot reconstruct from another: error breakdowns.

A results run (LFRE or GFRE with pointwise errors) holds, for every source→target pair
and every test environment :math:`i`, the error norm :math:`e_i = \\|x'_i - \\tilde x'_i\\|`.
Grouping the test environments by the subset of their structure or by their element
gives, for every pair and group :math:`g` with :math:`n_g` test environments,

.. math::

    \\mathrm{RMSE}_g = \\sqrt{\\frac{1}{n_g} \\sum_{i \\in g} e_i^2 },

so that :math:`\\sum_g n_g \\mathrm{RMSE}_g^2 / n_{test}` is the square of the run's error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dfre.errors import DfreError

BY_CHOICES = ("subset", "element")


def pointwise_breakdown(
    pointwise: np.ndarray, labels: Sequence[Any], names: Sequence[str]
) -> pd.DataFrame:
    """RMSE and count per (source, target, group) of pointwise errors (M, M, n_test).

    ``labels`` gives the group of every test environment. Pairs that were not computed
    (all NaN) are left out.
    """
    pointwise = np.asarray(pointwise, dtype=np.float64)
    labels = np.asarray(labels)
    if pointwise.ndim != 3 or pointwise.shape[:2] != (len(names), len(names)):
        raise DfreError(
            f"pointwise errors have shape {pointwise.shape}, expected (M, M, n_test) with "
            f"M = {len(names)} feature sets"
        )
    if labels.shape != (pointwise.shape[2],):
        raise DfreError(
            f"{labels.shape[0] if labels.ndim else 0} labels for {pointwise.shape[2]} test "
            "environments: give one label per test environment"
        )
    groups, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(groups))
    records = []
    for i, source in enumerate(names):
        for j, target in enumerate(names):
            squares = pointwise[i, j] ** 2
            if np.isnan(squares).all():
                continue
            sums = np.bincount(inverse, weights=squares, minlength=len(groups))
            for g, group in enumerate(groups):
                records.append(
                    {
                        "source": source,
                        "target": target,
                        "group": group.item() if hasattr(group, "item") else group,
                        "count": int(counts[g]),
                        "rmse": float(np.sqrt(sums[g] / counts[g])),
                    }
                )
    return pd.DataFrame.from_records(
        records, columns=["source", "target", "group", "count", "rmse"]
    )


def test_labels(store: Any, test_rows: np.ndarray, by: str) -> np.ndarray:
    """Subset label or chemical symbol of each test environment (atom row) of ``store``."""
    if by == "subset":
        return store.subsets()[store.structure_index()[test_rows]].astype(str)
    if by == "element":
        from ase.data import chemical_symbols

        return np.asarray(chemical_symbols, dtype=object)[store.numbers()[test_rows]].astype(str)
    raise DfreError(f"breakdown by '{by}' is not known: use one of {', '.join(BY_CHOICES)}")


def breakdown(store: Any, run: str = "lfre", by: str = "subset") -> pd.DataFrame:
    """Per-subset or per-element RMSE (with counts) of every pair of results ``run``.

    ``store`` is a :class:`~dfre.store.Store` or its path; the run must hold pointwise
    errors (``dfre lfre`` always writes them, ``dfre gfre`` unless ``--no-pointwise``).
    """
    from dfre.store import Store

    st = store if isinstance(store, Store) else Store.open(store)
    group = st.result(run)
    if "pointwise" not in group.array_keys():
        raise DfreError(
            f"results/{run} of {st.path} has no pointwise errors: recompute it with "
            "pointwise errors (dfre gfre without --no-pointwise)"
        )
    names = list(group.attrs["names"])
    test_rows = np.asarray(group["test_rows"][...], dtype=np.int64)
    labels = test_labels(st, test_rows, by)
    return pointwise_breakdown(np.asarray(group["pointwise"][...]), labels, names)
