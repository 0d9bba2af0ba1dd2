"""The steps of an analysis on one store, each shown, timed, and skipped when up to date.

:class:`Steps` runs what ``dfre run``, ``dfre demo`` and the computing commands do to a
store -- featurize a model, a GFRE/LFRE comparison, a checkpoint curve, cumulant
descriptors and their studies, a PCovR map, the report -- with four common rules:

- **checked first**: names, selections and sizes are checked against the store before
  anything computes (so a bad selection fails before a cluster starts);
- **reused when up to date**: a step whose inputs and settings are those recorded with
  its output (:mod:`dfre.reuse`) is skipped; ``force=True`` recomputes;
- **a cluster only when needed**: the cluster (a context manager factory) is started at
  the first step that computes, so a re-run with nothing to do never starts one;
- **shown and timed**: each step is a :func:`dfre.progress.phase` (live bar, or one
  timestamped line) and is recorded in :attr:`Steps.records` for a closing summary.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfre import progress
from dfre.errors import DfreError
from dfre.reuse import (
    descriptor_reusable,
    gfre_settings,
    input_key,
    lfre_settings,
    reusable,
    stamp,
    stamp_descriptor,
)

#: Train rows GFRE needs in every fold (skmatter's 2-fold cross-validation of the ridge).
GFRE_MIN_TRAIN = 2
#: What to do when LFRE's k exceeds the train rows.
LOWER_K = "lower k (--k) or ask for fewer test rows"


@dataclass
class Record:
    """One step that ran (or was reused): what, on what, how long."""

    stage: str
    what: str
    seconds: float
    reused: bool = False


class Steps:
    """Steps on ``store`` (opened for writing); use as a context manager.

    ``cluster`` makes the context manager of the Dask client (e.g.
    ``lambda: client_from_args(args)``), entered at the first step that computes and
    left at the end; None computes on the active scheduler.
    """

    def __init__(
        self,
        store: Any,
        *,
        cluster: Callable[[], contextlib.AbstractContextManager] | None = None,
        force: bool = False,
    ):
        self.store = store
        self.force = force
        self.records: list[Record] = []
        self.stage = ""
        self._cluster_factory = cluster
        self._stack = contextlib.ExitStack()
        self.cluster_started = False

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def compute_here(self) -> None:
        """Start the cluster (once) before a step that computes."""
        if not self.cluster_started and self._cluster_factory is not None:
            self._stack.enter_context(self._cluster_factory())
        self.cluster_started = True

    def _reused(
        self, what: str, detail: str = "inputs and settings unchanged", hint: bool = True
    ) -> None:
        progress.say(f"{what}: {detail}, reused" + (" (--force recomputes)" if hint else ""))
        self.records.append(Record(self.stage, what, 0.0, reused=True))

    @contextlib.contextmanager
    def _computing(self, what: str, **phase: Any):
        self.compute_here()
        start = time.perf_counter()
        with progress.phase(what, **phase) as step:
            yield step
        self.records.append(Record(self.stage, what, time.perf_counter() - start))

    def _result(self, run: str, key: str, what: str, compute: Callable[[], Any]) -> str:
        """``results/<run>``: reused when its key is ``key`` (unless forced), else made by
        ``compute()`` and stamped with ``key``; returns ``run``."""
        if not self.force and reusable(self.store, run, key):
            self._reused(what)
            return run
        with self._computing(what):
            compute()
        stamp(self.store, run, key)
        return run

    # ---------------------------------------------------------------- features
    def featurize(
        self,
        model: str,
        *,
        layers: Sequence[str] | None = None,
        batch_atoms: int | None = None,
        device: str = "cpu",
        **options: Any,
    ) -> Any:
        """Featurize ``model`` unless every requested layer is complete with its weights."""
        from dfre.featurize import DEFAULT_BATCH_ATOMS, featurize, featurize_is_complete

        done = featurize_is_complete(self.store, model, layers)
        if done:  # featurize only ever computes what is missing: nothing to force
            self._reused(f"features {model}", f"{', '.join(done)} complete", hint=False)
            return None
        self.compute_here()
        start = time.perf_counter()
        report = featurize(
            self.store,
            model,
            layers=layers,
            batch_atoms=batch_atoms or DEFAULT_BATCH_ATOMS,
            device=device,
            **options,
        )
        self.records.append(Record(self.stage, f"features {model}", time.perf_counter() - start))
        if report.masked:
            atoms = sum(int(self.store.counts[s]) for s in report.masked)
            reasons = sorted(set(report.masked.values()))
            progress.say(
                f"warning: {model} cannot handle {len(report.masked)} structure(s) "
                f"({atoms} atoms): {'; '.join(reasons[:3])}"
                f"{' ...' if len(reasons) > 3 else ''}; they are masked and left out of "
                "every comparison with this model"
            )
        return report

    # ---------------------------------------------------------------- comparisons
    def compare(
        self,
        metric: str,
        names: Sequence[str],
        selection: str,
        *,
        run: str,
        seed: int = 0,
        k: int | str | None = None,
        **options: Any,
    ) -> str:
        """GFRE or LFRE of ``names`` into ``results/<run>``; returns ``run``.

        ``k`` (LFRE) and ``options`` (e.g. ``solver``, ``alphas`` of GFRE, ``device`` of
        LFRE) go to :func:`dfre.metrics.gfre_store` / :func:`dfre.metrics.lfre_store`;
        they and the selection are the settings of the result's key.
        """
        from dfre.data.selection import check_train_rows, selection_for_store

        names = list(names)
        for name in names:
            self.store.feature_array(name)
        if metric not in ("gfre", "lfre"):
            raise DfreError(f"metric must be 'gfre' or 'lfre' (got {metric!r})")
        if len(set(names)) != len(names):
            raise DfreError(f"feature sets are repeated in {names}: give each once")
        if metric == "gfre" and len(names) < 2:
            raise DfreError(f"give at least two feature sets to compare (got {names})")
        chosen = selection_for_store(
            selection, self.store, seed=seed, valid=self.store.valid_rows(names)
        )
        if metric == "gfre":
            settings = gfre_settings(selection, seed, options)
            check_train_rows(chosen, GFRE_MIN_TRAIN, "GFRE's 2-fold cross-validation")
        else:
            settings = lfre_settings(selection, seed, k, options)
            needed = required_neighbours(self.store, names, k)
            check_train_rows(chosen, needed, f"LFRE with k = {needed} neighbours", LOWER_K)
        key = input_key(self.store, metric, names, settings)
        what = f"results/{run}: {metric.upper()} of {len(names)} feature sets"

        def compute() -> None:
            if metric == "gfre":
                from dfre.metrics.gfre import gfre_store

                gfre_store(self.store, names, chosen, run=run, seed=seed, **options)
            else:
                from dfre.metrics.lfre import lfre_store

                lfre_store(self.store, names, chosen, k=k, run=run, seed=seed, **options)

        return self._result(run, key, what, compute)

    def checkpoints(
        self,
        metric: str,
        names: Sequence[str],
        *,
        run: str,
        epochs: Sequence[float] | None = None,
        reference: str | None = None,
        selection: str = "stratified:1000",
        seed: int = 0,
        k: int | str | None = None,
    ) -> str:
        """FRE of each checkpoint against the reference into ``results/<run>``."""
        from dfre.data.selection import check_train_rows, selection_for_store
        from dfre.studies.checkpoints import checkpoint_trajectory

        names = list(names)
        for name in names:
            self.store.feature_array(name)
        chosen = selection_for_store(
            selection, self.store, seed=seed, valid=self.store.valid_rows(names)
        )
        needed = GFRE_MIN_TRAIN if metric == "gfre" else required_neighbours(self.store, names, k)
        check_train_rows(chosen, needed, f"{metric.upper()} of the checkpoints")
        settings = {
            "selection": selection,
            "seed": seed,
            "k": k,
            "epochs": list(epochs) if epochs is not None else None,
            "reference": reference,
        }
        key = input_key(self.store, f"{metric}-checkpoints", names, settings)
        what = f"results/{run}: {metric.upper()} along {len(names)} checkpoints"
        return self._result(
            run,
            key,
            what,
            lambda: checkpoint_trajectory(
                self.store,
                names,
                epochs=epochs,
                reference=reference,
                metric=metric,
                selection=chosen,
                seed=seed,
                k=k,
                run=run,
            ),
        )

    # ---------------------------------------------------------------- cumulants
    def cumulants(
        self, feature: str, order: int, *, name: str | None = None, device: str = "cpu"
    ) -> str:
        """``descriptors/<name>`` of ``feature`` up to ``order``; returns the name."""
        from dfre.descriptors.cumulants import CumulantNotice, compute_cumulants, descriptor_name

        self.store.feature_array(feature)
        name = name or descriptor_name(feature, order)
        key = input_key(self.store, "cumulants", [feature], {"order": order, "name": name})
        what = f"descriptors/{name}: cumulants of {feature} up to order {order}"
        if not self.force and descriptor_reusable(self.store, name, key):
            self._reused(what)
            return name
        with self._computing(what), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CumulantNotice)
            compute_cumulants(self.store, feature, order, name=name, device=device)
        for warning in caught:
            if issubclass(warning.category, CumulantNotice):
                progress.say(f"notice: {feature}: {warning.message}")
            else:
                warnings.showwarning(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        stamp_descriptor(self.store, name, key)
        return name

    def order_study(
        self,
        descriptor: str,
        *,
        metric: str = "gfre",
        selection: str = "kfold:2",
        seed: int = 0,
        k: int | str | None = None,
        run: str | None = None,
    ) -> str:
        """FRE between the cumulant orders of ``descriptor`` (Fig. 8); returns the run."""
        from dfre.descriptors.cumulants import cumulant_order_study

        _require_descriptor(self.store, descriptor)
        run = run or f"{metric}-orders-{descriptor}"
        settings = {"metric": metric, "selection": selection, "seed": seed, "k": k}
        key = input_key(self.store, "cumulant-orders", [descriptor], settings)
        what = f"results/{run}: {metric.upper()} between the cumulant orders of {descriptor}"
        return self._result(
            run,
            key,
            what,
            lambda: cumulant_order_study(
                self.store, descriptor, metric=metric, selection=selection, seed=seed, k=k, run=run
            ),
        )

    def cross_model_cumulants(
        self,
        descriptors: Sequence[str],
        *,
        metric: str = "gfre",
        selection: str = "kfold:2",
        seed: int = 0,
        k: int | str | None = None,
        run: str | None = None,
    ) -> str:
        """FRE between the cumulant descriptors of several models (Fig. S10)."""
        from dfre.descriptors.cumulants import cross_model_cumulants

        for descriptor in descriptors:
            _require_descriptor(self.store, descriptor)
        run = run or f"{metric}-cumulants"
        settings = {"metric": metric, "selection": selection, "seed": seed, "k": k}
        key = input_key(self.store, "cross-model-cumulants", list(descriptors), settings)
        what = f"results/{run}: {metric.upper()} between {len(descriptors)} cumulant descriptors"
        return self._result(
            run,
            key,
            what,
            lambda: cross_model_cumulants(
                self.store,
                list(descriptors),
                metric=metric,
                selection=selection,
                seed=seed,
                k=k,
                run=run,
            ),
        )

    # ---------------------------------------------------------------- maps
    def pcovr(self, descriptor: str, *, run: str | None = None, **options: Any) -> str:
        """A PCovR map of ``descriptor`` (options of :func:`dfre.projection.pcovr_map`)."""
        from dfre.projection.pcovr import COHESIVE_ENERGY, pcovr_map, store_target

        _require_descriptor(self.store, descriptor)
        run = run or f"pcovr-{descriptor}"
        energy = options.get("energy_key", "energy")
        target = options.get("target")
        store_target(self.store, target or COHESIVE_ENERGY, energy_key=energy)  # a bad target
        info = [f"structures/info/{key}" for key in (energy, target) if key]
        key = input_key(
            self.store, "pcovr", [descriptor], options, arrays=["structures/numbers", *info]
        )
        what = f"results/{run}: PCovR map of {descriptor}"
        return self._result(
            run, key, what, lambda: pcovr_map(self.store, descriptor, run=run, **options)
        )


def _require_descriptor(store: Any, name: str) -> None:
    """A one-line error (with a suggestion) for a descriptor the store does not hold."""
    if name not in store.descriptor_names():
        store.descriptor(name)  # raises the store's error


def required_neighbours(store: Any, names: Sequence[str], k: Any) -> int:
    """The largest k any pair of feature sets ``names`` needs (train rows per fold)."""
    from dfre.metrics.lfre import k_matrix

    dims = [int(store.feature_array(name).shape[1]) for name in names]
    return int(k_matrix(dims, k).max())


def check_structure_selection(
    store: Any, spec: str, seed: int, metric: str, k: Any, widths: Sequence[int]
) -> None:
    """Check a structure-level selection (cumulant studies) before anything computes.

    ``widths`` are the widths of the compared descriptors; LFRE needs as many train
    structures per fold as its largest k.
    """
    from dfre.data.selection import check_train_rows, make_selection
    from dfre.metrics.lfre import k_matrix

    codes = np.unique(np.asarray(store.subsets()).astype(str), return_inverse=True)[1]
    chosen = make_selection(
        spec,
        store.n_structures,
        labels=codes,
        groups=np.arange(store.n_structures),
        seed=seed,
    )
    if metric == "gfre":
        check_train_rows(chosen, GFRE_MIN_TRAIN, "GFRE's 2-fold cross-validation")
    else:
        needed = int(k_matrix(list(widths), k).max())
        check_train_rows(chosen, needed, f"LFRE with k = {needed} neighbours", LOWER_K)


def masked_atoms(store: Any) -> list[dict]:
    """Atoms the models could not handle, one record per reason and set of structures.

    Each record: ``reason`` (as featurize recorded it), ``structures`` (their indices),
    ``atoms`` (their number) and ``models`` (every model that masked exactly these
    structures for this reason); the atoms are left out of every comparison with those
    models.
    """
    by_model: dict[str, dict[str, list[int]]] = {}
    features = store.group["features"]
    for model in sorted(features.group_keys()):
        for index, reason in dict(features[model].attrs.get("masked", {})).items():
            by_model.setdefault(model, {}).setdefault(reason, []).append(int(index))
    records: dict[tuple, dict] = {}
    counts = store.counts
    for model, reasons in by_model.items():
        for reason, structures in reasons.items():
            structures = sorted(structures)
            entry = records.setdefault(
                (reason, tuple(structures)),
                {
                    "reason": reason,
                    "structures": structures,
                    "atoms": int(counts[structures].sum()),
                    "models": [],
                },
            )
            entry["models"].append(model)
    return list(records.values())


def masked_text(record: dict) -> str:
    """One record of :func:`masked_atoms` in words."""
    structures = record["structures"]
    which = ", ".join(str(s) for s in structures[:5]) + (" ..." if len(structures) > 5 else "")
    return (
        f"{record['atoms']} atoms in {len(structures)} structure(s) ({which}): "
        f"{record['reason']}; masked for {', '.join(record['models'])}"
    )
