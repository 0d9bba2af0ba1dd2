"""FRE along a training trajectory (paper Sec. III D, Fig. 6).

Given the feature sets of an ordered series of checkpoints of one model,
:math:`F_1, \\dots, F_n` (e.g. ``pet-e10/ll``, ``pet-e20/ll``, ..., ``pet-final/ll``),
the trajectory is the reconstruction error of the reference (by default the last,
fully trained checkpoint) from each checkpoint,

.. math:: e_t = \\mathrm{FRE}(F_t \\to F_{\\mathrm{ref}}), \\qquad t = 1..n,

so it decays towards 0 as the features converge. Only the pairs
``(t, ref)`` are computed (GFRE from one pass over the rows, LFRE with one kNN per
checkpoint). The result follows the results contract (``kind`` ``gfre`` / ``lfre``,
an (n, n) ``matrix`` with NaN outside the reference column) with
``config["study"] = "checkpoints"`` and ``config["checkpoints"] = {"epochs": [...],
"reference": NAME, "x_label": ...}``; ``dfre report`` draws it as curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dfre.errors import DfreError
from dfre.lock import writes_store

METRICS = ("gfre", "lfre")


@writes_store("dfre checkpoints")
def checkpoint_trajectory(
    store: Any,
    names: Sequence[str],
    *,
    epochs: Sequence[float] | None = None,
    reference: str | None = None,
    metric: str = "gfre",
    selection: Any = "stratified:1000",
    seed: int = 0,
    k: int | None = None,
    run: str | None = None,
    x_label: str = "epoch",
) -> Any:
    """FRE of each checkpoint's feature set against ``reference`` (default: the last).

    ``names`` are feature sets of ``store`` in training order, ``epochs`` their x values
    (default 0..n-1). ``selection`` is a spec built over the atom rows valid in every
    feature set (or a ready selection). Writes ``results/<run>`` (default
    ``<metric>-checkpoints``) and returns the engine's result; the trajectory is
    ``result.matrix[:, names.index(reference)]``.
    """
    from dfre.data.selection import selection_for_store

    names = list(names)
    if metric not in METRICS:
        raise DfreError(f"metric must be 'gfre' or 'lfre' (got {metric!r})")
    if len(names) < 2:
        raise DfreError("a checkpoint trajectory needs at least two feature sets")
    if len(set(names)) != len(names):
        raise DfreError(f"feature sets are repeated in {names}: give each checkpoint once")
    reference = names[-1] if reference is None else reference
    if reference not in names:
        raise DfreError(f"reference {reference} is not one of the checkpoints {names}")
    epochs = list(range(len(names))) if epochs is None else [float(e) for e in epochs]
    if len(epochs) != len(names):
        raise DfreError(f"{len(epochs)} epochs given for {len(names)} checkpoints: give one each")
    arrays = {name: store.features(name) for name in names}  # unknown names raise here
    if isinstance(selection, str):
        selection = selection_for_store(selection, store, seed=seed, valid=store.valid_rows(names))
    target = names.index(reference)
    pairs = [(source, target) for source in range(len(names))]
    if metric == "gfre":
        from dfre.metrics.gfre import gfre_matrix, write_result

        result = gfre_matrix(arrays, selection, pointwise=True, pairs=pairs)
    else:
        from dfre.metrics.lfre import lfre_matrix, write_result

        result = lfre_matrix(arrays, selection, k, pairs=pairs)
    result.config.update(
        {
            "study": "checkpoints",
            "seed": seed,
            "checkpoints": {"epochs": epochs, "reference": reference, "x_label": x_label},
        }
    )
    write_result(store, run or f"{metric}-checkpoints", result)
    return result
