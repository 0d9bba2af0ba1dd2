"""A whole study in one TOML file: ``dfre run study.toml``.

Every step reads and writes one store, so a re-run repeats only what is missing: the
dataset is built only into a new store (ingest skips files already ingested),
featurize computes only chunks not yet done, and the analyses are recomputed from
the stored features (they are cheap next to featurization). Paths are relative to the
TOML file. Example (every key but ``store`` is optional)::

    store = "study.zarr"

    [dataset]                      # only when the store does not exist yet
    sample_atoms = 3000            # the embedded sample dataset, or
    # files = ["data/*.extxyz"]    # ASE-readable files (globs), with
    # subset_key = "config_type"   # the info key naming each structure's subset
    seed = 0

    [features]
    models = ["chgnet-0.3.0", "sevennet-0"]
    layers = ["ll", "bb"]          # default: every layer a model offers
    batch_atoms = 2048

    [[compare]]                    # one GFRE and/or LFRE run: results/<metric>-<name>
    name = "cross-model"
    features = ["chgnet-0.3.0/ll", "sevennet-0/ll"]   # default: every feature set
    metrics = ["gfre", "lfre"]
    selection = "stratified:1000"
    seed = 0
    # k = 50                       # LFRE neighbours, or "min" (default) / "max" per pair
    # solver = "auto"              # GFRE: "auto" (default), "gram" or "tsqr"
    # alpha_floor = "auto"         # opt-in noise-aware cutoff grid ("none": skmatter's)

    [[checkpoints]]                # FRE of checkpoints against the last (Fig. 6)
    name = "finetune"
    features = ["ft-e0/ll", "ft-e10/ll", "ft-e100/ll"]
    epochs = [0, 10, 100]
    metrics = ["gfre"]

    [cumulants]                    # descriptors/cumulants-<model>-<layer>-M<order>
    order = 8
    features = ["chgnet-0.3.0/ll"] # default: every feature set
    studies = ["gfre"]             # FRE between orders and between models (Fig. 8, S10)
    selection = "kfold:2"

    [pcovr]                        # results/pcovr-<descriptor>
    descriptors = []               # default: every cumulant descriptor made above
    target = "cohesive_energy"     # or a numeric structure info key
    remove_outliers = false        # true: IsolationForest outlier removal (paper's notebook)

    [report]
    out = "report"                 # figures + index.html
    chemiscope = "map.json.gz"     # optional chemiscope file
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dfre.errors import DfreError
from dfre.lock import writes_store

#: Allowed keys of each table and their types.
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "dataset": {
        "sample_atoms": int,
        "files": list,
        "format": str,
        "subset_key": str,
        "seed": int,
        "chunk_atoms": int,
    },
    "features": {"models": list, "layers": list, "batch_atoms": int, "device": str},
    "compare": {
        "name": str,
        "features": list,
        "metrics": list,
        "selection": str,
        "seed": int,
        "k": (int, str),
        "solver": str,
        "alpha_floor": (str, float),
    },
    "checkpoints": {
        "name": str,
        "features": list,
        "epochs": list,
        "reference": str,
        "metrics": list,
        "selection": str,
        "seed": int,
        "k": (int, str),
    },
    "cumulants": {"order": int, "features": list, "studies": list, "selection": str, "seed": int},
    "pcovr": {
        "descriptors": list,
        "target": str,
        "energy_key": str,
        "mixing": (int, float),
        "components": int,
        "remove_outliers": bool,
    },
    "report": {"out": str, "chemiscope": str, "max_structures": int},
}
ARRAY_TABLES = ("compare", "checkpoints")
METRICS = ("gfre", "lfre")


@dataclass
class Study:
    """A parsed study file: the store path and one dict per table (lists for arrays)."""

    path: str
    store: str
    tables: dict[str, Any] = field(default_factory=dict)

    def get(self, table: str) -> Any:
        return self.tables.get(table)


def load_study(path: str | os.PathLike) -> Study:
    """Read and check ``path``; every problem is a one-line :class:`DfreError`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise DfreError(f"study file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise DfreError(f"study file {path} is not valid TOML: {error}") from None
    if not isinstance(data.get("store"), str):
        raise DfreError(f'study file {path} needs store = "PATH" (the dfre store of the study)')
    unknown = set(data) - set(SCHEMA) - {"store"}
    if unknown:
        raise DfreError(
            f"study file {path}: unknown table or key {', '.join(sorted(unknown))}; "
            f"known: store, {', '.join(SCHEMA)}"
        )
    tables: dict[str, Any] = {}
    for table, value in data.items():
        if table == "store":
            continue
        if table in ARRAY_TABLES:
            if not isinstance(value, list):
                raise DfreError(f"study file {path}: write [[{table}]] (an array of tables)")
            tables[table] = [_check_table(path, table, t, i) for i, t in enumerate(value)]
        else:
            if not isinstance(value, dict):
                raise DfreError(f"study file {path}: [{table}] must be a table")
            tables[table] = _check_table(path, table, value, None)
    folder = os.path.dirname(os.path.abspath(path))
    store = os.path.join(folder, data["store"])
    if not tables.get("dataset") and not (os.path.isdir(store) and os.listdir(store)):
        raise DfreError(
            f"store {store} does not exist and the study has no [dataset] to build it: "
            "add [dataset] with sample_atoms = N or files = [...]"
        )
    return Study(path, store, tables)


def _check_table(path: str, table: str, value: Any, index: int | None) -> dict:
    where = f"[{table}]" if index is None else f"[[{table}]] number {index + 1}"
    if not isinstance(value, dict):
        raise DfreError(f"study file {path}: {where} must be a table")
    schema = SCHEMA[table]
    for key, item in value.items():
        if key not in schema:
            raise DfreError(
                f"study file {path}: {where} has unknown key '{key}'; known: {', '.join(schema)}"
            )
        if (isinstance(item, bool) and schema[key] is not bool) or not isinstance(
            item, schema[key]
        ):
            expected = schema[key] if isinstance(schema[key], type) else schema[key][0]
            raise DfreError(
                f"study file {path}: {where} key '{key}' must be {expected.__name__}, got {item!r}"
            )
    if isinstance(value.get("k"), str) and value["k"] not in ("min", "max"):
        raise DfreError(
            f'study file {path}: {where} k = {value["k"]!r}; give a number, "min" or "max"'
        )
    if value.get("solver", "auto") not in ("auto", "gram", "tsqr"):
        raise DfreError(
            f'study file {path}: {where} solver = {value["solver"]!r}; use "auto", "gram" or "tsqr"'
        )
    floor = value.get("alpha_floor", "none")
    if not (floor in ("none", "auto") or (isinstance(floor, float) and 0 <= floor < 1)):
        raise DfreError(
            f'study file {path}: {where} alpha_floor = {floor!r}; use "none", "auto" or a '
            "relative cutoff in [0, 1)"
        )
    for key in ("metrics", "studies"):
        for metric in value.get(key, []):
            if metric not in METRICS:
                raise DfreError(
                    f"study file {path}: {where} {key} has '{metric}'; use gfre and/or lfre"
                )
    if table in ARRAY_TABLES and "name" not in value:
        raise DfreError(f'study file {path}: {where} needs name = "..." (its results name)')
    return dict(value)


@writes_store("dfre run", argument="study", create=True)
def run_study(study: Study, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step of ``study`` on the active Dask scheduler; return what was made."""
    from dfre.store import Store

    made: dict[str, Any] = {"store": study.store, "results": [], "descriptors": []}
    folder = os.path.dirname(os.path.abspath(study.path))
    store = _dataset(study, folder, log)
    features = study.get("features")
    if features:
        _featurize(store, features, log)
    store = Store.open(study.store, mode="r+")
    for spec in study.get("compare") or []:
        made["results"] += _compare(store, spec, log)
    for spec in study.get("checkpoints") or []:
        made["results"] += _checkpoints(store, spec, log)
    if study.get("cumulants") is not None:
        descriptors, results = _cumulants(store, study.get("cumulants"), log)
        made["descriptors"] += descriptors
        made["results"] += results
    if study.get("pcovr") is not None:
        made["results"] += _pcovr(store, study.get("pcovr"), made["descriptors"], log)
    report = study.get("report")
    if report is not None:
        made["report"] = _report(store, report, folder, made["results"], log)
    return made


def _dataset(study: Study, folder: str, log: Callable[[str], None]) -> Any:
    from dfre.store import Store, _is_empty_dir

    spec = study.get("dataset") or {}
    exists = os.path.isdir(study.store) and not _is_empty_dir(study.store)
    if exists and "files" not in spec:
        return Store.open(study.store, mode="r+")
    chunk = spec.get("chunk_atoms", 1 << 16)
    if "files" in spec:
        from dfre.data.ingest import ingest

        files = []
        for pattern in spec["files"]:
            matches = sorted(glob.glob(os.path.join(folder, pattern)))
            if not matches:
                raise DfreError(
                    f"[dataset] files: nothing matches {pattern} (next to {study.path})"
                )
            files += matches
        ingest(
            files,
            study.store,
            format=spec.get("format"),
            subset_key=spec.get("subset_key"),
            chunk_atoms=chunk,
            log=log,
        )
    elif "sample_atoms" in spec:
        from dfre.data.sample import write_sample

        write_sample(study.store, spec["sample_atoms"], spec.get("seed", 0), chunk_atoms=chunk)
        log(f"sample dataset: {spec['sample_atoms']} atoms into {study.store}")
    else:
        raise DfreError("[dataset] needs sample_atoms = N or files = [...]")
    return Store.open(study.store, mode="r+")


def _featurize(store: Any, spec: dict, log: Callable[[str], None]) -> None:
    from dfre.featurize import featurize

    for model in spec.get("models", []):
        report = featurize(
            store,
            model,
            layers=spec.get("layers"),
            batch_atoms=spec.get("batch_atoms", 2048),
            device=spec.get("device", "cpu"),
        )
        log(
            f"features {model}: layers {', '.join(report.layers)}, "
            f"{report.n_atoms_computed} atoms computed in {report.seconds:.1f} s"
        )


def _feature_names(store: Any, names: list | None) -> list[str]:
    names = list(names) if names else store.feature_names()
    for name in names:
        store.feature_array(name)
    return names


def _compare(store: Any, spec: dict, log: Callable[[str], None]) -> list[str]:
    from dfre.metrics.gfre import gfre_store
    from dfre.metrics.lfre import lfre_store

    names = _feature_names(store, spec.get("features"))
    selection = spec.get("selection", "stratified:1000")
    seed = spec.get("seed", 0)
    runs = []
    for metric in spec.get("metrics", list(METRICS)):
        run = f"{metric}-{spec['name']}"
        floor = spec.get("alpha_floor")
        floor = None if floor in (None, "none") else floor
        if metric == "gfre":
            gfre_store(
                store,
                names,
                selection,
                run=run,
                seed=seed,
                solver=spec.get("solver", "auto"),
                alpha_floor=floor,
            )
        else:
            lfre_store(
                store, names, selection, k=spec.get("k"), run=run, seed=seed, alpha_floor=floor
            )
        log(f"results/{run}: {metric.upper()} of {len(names)} feature sets")
        runs.append(run)
    return runs


def _checkpoints(store: Any, spec: dict, log: Callable[[str], None]) -> list[str]:
    from dfre.studies.checkpoints import checkpoint_trajectory

    runs = []
    for metric in spec.get("metrics", list(METRICS)):
        run = f"{metric}-{spec['name']}"
        checkpoint_trajectory(
            store,
            _feature_names(store, spec.get("features")),
            epochs=spec.get("epochs"),
            reference=spec.get("reference"),
            metric=metric,
            selection=spec.get("selection", "stratified:1000"),
            seed=spec.get("seed", 0),
            k=spec.get("k"),
            run=run,
        )
        log(f"results/{run}: {metric.upper()} along checkpoints")
        runs.append(run)
    return runs


def _cumulants(store: Any, spec: dict, log: Callable[[str], None]) -> tuple[list, list]:
    from dfre.descriptors.cumulants import (
        compute_cumulants,
        cross_model_cumulants,
        cumulant_order_study,
    )

    order = spec.get("order", 8)
    descriptors = [
        compute_cumulants(store, n, order) for n in _feature_names(store, spec.get("features"))
    ]
    log(f"descriptors: {', '.join(descriptors)}")
    runs = []
    options = {"selection": spec.get("selection", "kfold:2"), "seed": spec.get("seed", 0)}
    for metric in spec.get("studies", []):
        for descriptor in descriptors:
            run = f"{metric}-orders-{descriptor}"
            cumulant_order_study(store, descriptor, metric=metric, run=run, **options)
            runs.append(run)
        if len(descriptors) > 1:
            run = f"{metric}-cumulants"
            cross_model_cumulants(store, descriptors, metric=metric, run=run, **options)
            runs.append(run)
    if runs:
        log(f"results: {', '.join(runs)}")
    return descriptors, runs


def _pcovr(store: Any, spec: dict, made: list[str], log: Callable[[str], None]) -> list[str]:
    from dfre.projection.pcovr import COHESIVE_ENERGY, pcovr_map

    descriptors = (
        spec.get("descriptors")
        or made
        or [d for d in store.descriptor_names() if d.startswith("cumulants-")]
    )
    if not descriptors:
        raise DfreError("[pcovr] has no descriptors: add [cumulants] or list descriptors = [...]")
    runs = []
    for descriptor in descriptors:
        run = f"pcovr-{descriptor}"
        pcovr_map(
            store,
            descriptor,
            target=spec.get("target", COHESIVE_ENERGY),
            energy_key=spec.get("energy_key", "energy"),
            mixing=float(spec.get("mixing", 0.5)),
            n_components=spec.get("components", 2),
            run=run,
            remove_outliers=spec.get("remove_outliers", False),
        )
        runs.append(run)
    log(f"PCovR maps: {', '.join(runs)}")
    return runs


def _report(store: Any, spec: dict, folder: str, runs: list[str], log: Callable[[str], None]):
    from dfre.report import make_report
    from dfre.report.chemiscope import export_chemiscope

    out = os.path.join(folder, spec.get("out", "report"))
    report = make_report(store, out, runs or None)
    log(f"report: {report.html}")
    if "chemiscope" in spec:
        summary = export_chemiscope(
            store,
            os.path.join(folder, spec["chemiscope"]),
            max_structures=spec.get("max_structures"),
        )
        log(f"chemiscope: {summary['path']} ({summary['structures']} structures)")
    return report.html
