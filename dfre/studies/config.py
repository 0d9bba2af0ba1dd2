"""A whole study in one TOML file: ``dfre run study.toml``.

Every step reads and writes one store, so a re-run repeats only what is missing: the
dataset is built only into a new store (ingest skips files already ingested),
featurize computes only chunks not yet done, and an analysis whose inputs and settings
are unchanged is reused (:mod:`dfre.reuse`), so a re-run of a finished study only
writes the report. Paths are relative to the
TOML file. Example (every key but ``store`` is optional)::

    store = "study.zarr"

    [dataset]                      # only when the store does not exist yet
    sample_atoms = 3000            # the embedded sample dataset, or
    # files = ["data/*.extxyz"]    # ASE-readable files (globs), with
    # subset_key = "config_type"   # the info key naming each structure's subset
    seed = 0
    # subsets = {bulk = 2, molecules = 1}   # sample subsets drawn, by weight (default: all)

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
    min_count = 10                 # breakdowns: subsets/elements with fewer test rows left out
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
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
        "subsets": dict,
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
    "report": {"out": str, "chemiscope": str, "max_structures": int, "min_count": int},
}
ARRAY_TABLES = ("compare", "checkpoints")
#: Sample datasets of this many atoms or more are built on the cluster (as `dfre sample`).
LARGE_SAMPLE_ATOMS = 200_000
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
    store = os.path.normpath(os.path.join(folder, data["store"]))
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
    if table == "dataset" and "subsets" in value:
        from dfre.data.sample import subset_probabilities

        try:
            subset_probabilities(value["subsets"])
        except DfreError as error:
            raise DfreError(f"study file {path}: [dataset] {error}") from None
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
def run_study(
    study: Study,
    *,
    log: Callable[[str], None] = print,
    cluster: Callable[[], contextlib.AbstractContextManager] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run every step of ``study``; return what was made and how long each stage took.

    ``log`` gets one line as each stage starts (``[3/7] compare cross-model: ...``) and
    one per step reused or noticed. ``cluster`` makes the context manager of the Dask
    client (e.g. ``lambda: client_from_args(args)``): it is started at the first step
    that has to compute, so a re-run whose results are all up to date starts none; None
    computes on the active scheduler. ``force=True`` recomputes up-to-date results.

    The returned dict has ``store``, ``results`` and ``descriptors`` (names), ``stages``
    (name, description, seconds, steps computed and reused), ``masked`` (see
    :func:`dfre.studies.steps.masked_atoms`) and ``report`` (the page) if one was made.
    """
    from dfre.store import Store

    made: dict[str, Any] = {"store": study.store, "results": [], "descriptors": [], "stages": []}
    folder = os.path.dirname(os.path.abspath(study.path))
    plan = _plan(study)
    stage = _StageLog(plan, log, made["stages"])
    with contextlib.ExitStack() as started:
        spec = study.get("dataset") or {}
        new = not (os.path.isdir(study.store) and os.listdir(study.store))
        if cluster is not None and new and spec.get("sample_atoms", 0) >= LARGE_SAMPLE_ATOMS:
            started.enter_context(cluster())  # a large sample is built by the cluster
            cluster = None
        with stage("dataset"):
            stage.note(_dataset(study, folder, log))
        store = Store.open(study.store, mode="r+")
        _run_steps(study, store, folder, stage, made, log, cluster, force)
    return made


def _run_steps(study, store, folder, stage, made, log, cluster, force) -> None:
    from dfre.studies.steps import Steps, masked_atoms

    with Steps(store, cluster=cluster, force=force) as steps:
        stage.steps = steps
        features = study.get("features")
        if features:
            with stage("features"):
                _featurize(steps, features)
            made["masked"] = masked_atoms(store)
        for spec in study.get("compare") or []:
            with stage(f"compare {spec['name']}"):
                made["results"] += _compare(steps, spec)
        for spec in study.get("checkpoints") or []:
            with stage(f"checkpoints {spec['name']}"):
                made["results"] += _checkpoints(steps, spec)
        if study.get("cumulants") is not None:
            with stage("cumulants"):
                descriptors, results = _cumulants(steps, study.get("cumulants"))
            made["descriptors"] += descriptors
            made["results"] += results
        if study.get("pcovr") is not None:
            with stage("pcovr"):
                made["results"] += _pcovr(steps, study.get("pcovr"), made["descriptors"])
        report = study.get("report")
        if report is not None:
            with stage("report"):
                made["report"] = _report(store, report, folder, made["results"], log)
                stage.note(made["report"])


def _plan(study: Study) -> dict[str, str]:
    """Stage name -> what it does, in the order the stages run."""
    plan = {}
    spec = study.get("dataset") or {}
    if "files" in spec:
        plan["dataset"] = f"ingest {len(spec['files'])} file pattern(s) into {study.store}"
    elif "sample_atoms" in spec:
        plan["dataset"] = f"sample dataset of {spec['sample_atoms']:,} atoms in {study.store}"
    else:
        plan["dataset"] = f"store {study.store}"
    features = study.get("features")
    if features:
        layers = ", ".join(features.get("layers") or ["all layers"])
        plan["features"] = f"{len(features.get('models', []))} models × {layers}"
    for spec in study.get("compare") or []:
        metrics = ", ".join(m.upper() for m in spec.get("metrics", METRICS))
        count = len(spec.get("features") or []) or "all"
        plan[f"compare {spec['name']}"] = (
            f"{metrics} of {count} feature sets, {spec.get('selection', 'stratified:1000')}"
        )
    for spec in study.get("checkpoints") or []:
        plan[f"checkpoints {spec['name']}"] = f"FRE of {len(spec.get('features', []))} checkpoints"
    cumulants = study.get("cumulants")
    if cumulants is not None:
        studies = ", ".join(m.upper() for m in cumulants.get("studies", []))
        plan["cumulants"] = f"order-{cumulants.get('order', 8)} cumulant descriptors" + (
            f"; {studies} between orders and models" if studies else ""
        )
    if study.get("pcovr") is not None:
        plan["pcovr"] = "PCovR maps of the descriptors"
    if study.get("report") is not None:
        plan["report"] = "figures and index.html"
    return plan


class _StageLog:
    """Logs each stage as it starts (``[i/n] name: what``) and records its time."""

    def __init__(self, plan: dict[str, str], log: Callable[[str], None], records: list):
        self.plan, self.log, self.records = plan, log, records
        self.steps = None
        self._notes: list[str] = []

    def note(self, text: str | None) -> None:
        if text:
            self._notes.append(text)

    @contextlib.contextmanager
    def __call__(self, name: str):
        index = list(self.plan).index(name) + 1
        self.log(f"[{index}/{len(self.plan)}] {name}: {self.plan[name]}")
        self._notes = []
        if self.steps is not None:
            self.steps.stage = name
        before = len(self.steps.records) if self.steps is not None else 0
        start = time.perf_counter()
        yield
        steps = self.steps.records[before:] if self.steps is not None else []
        self.records.append(
            {
                "name": name,
                "what": self.plan[name],
                "seconds": time.perf_counter() - start,
                "computed": sum(not r.reused for r in steps),
                "reused": sum(r.reused for r in steps),
                "notes": list(self._notes),
            }
        )


def _dataset(study: Study, folder: str, log: Callable[[str], None]) -> str:
    from dfre.store import Store, _is_empty_dir

    spec = study.get("dataset") or {}
    exists = os.path.isdir(study.store) and not _is_empty_dir(study.store)
    if exists and "files" not in spec:
        store = Store.open(study.store)
        return f"reused: {store.n_atoms:,} atoms in {store.n_structures:,} structures"
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

        write_sample(
            study.store,
            spec["sample_atoms"],
            spec.get("seed", 0),
            chunk_atoms=chunk,
            subsets=spec.get("subsets"),
        )
    else:
        raise DfreError("[dataset] needs sample_atoms = N or files = [...]")
    store = Store.open(study.store)
    return f"{store.n_atoms:,} atoms in {store.n_structures:,} structures"


def _featurize(steps: Any, spec: dict) -> None:
    for model in spec.get("models", []):
        steps.featurize(
            model,
            layers=spec.get("layers"),
            batch_atoms=spec.get("batch_atoms"),
            device=spec.get("device", "cpu"),
        )


def _feature_names(store: Any, names: list | None) -> list[str]:
    names = list(names) if names else store.feature_names()
    for name in names:
        store.feature_array(name)
    return names


def _compare(steps: Any, spec: dict) -> list[str]:
    names = _feature_names(steps.store, spec.get("features"))
    runs = []
    for metric in spec.get("metrics", list(METRICS)):
        floor = spec.get("alpha_floor")
        options = {"alpha_floor": None if floor in (None, "none") else floor}
        if metric == "gfre":
            options["solver"] = spec.get("solver", "auto")
        else:
            options["k"] = spec.get("k")
        runs.append(
            steps.compare(
                metric,
                names,
                spec.get("selection", "stratified:1000"),
                run=f"{metric}-{spec['name']}",
                seed=spec.get("seed", 0),
                **options,
            )
        )
    return runs


def _checkpoints(steps: Any, spec: dict) -> list[str]:
    return [
        steps.checkpoints(
            metric,
            _feature_names(steps.store, spec.get("features")),
            run=f"{metric}-{spec['name']}",
            epochs=spec.get("epochs"),
            reference=spec.get("reference"),
            selection=spec.get("selection", "stratified:1000"),
            seed=spec.get("seed", 0),
            k=spec.get("k"),
        )
        for metric in spec.get("metrics", list(METRICS))
    ]


def _cumulants(steps: Any, spec: dict) -> tuple[list, list]:
    order = spec.get("order", 8)
    names = _feature_names(steps.store, spec.get("features"))
    descriptors = [steps.cumulants(name, order) for name in names]
    runs = []
    options = {"selection": spec.get("selection", "kfold:2"), "seed": spec.get("seed", 0)}
    for metric in spec.get("studies", []):
        for descriptor in descriptors:
            runs.append(steps.order_study(descriptor, metric=metric, **options))
        if len(descriptors) > 1:
            runs.append(steps.cross_model_cumulants(descriptors, metric=metric, **options))
    return descriptors, runs


def _pcovr(steps: Any, spec: dict, made: list[str]) -> list[str]:
    from dfre.projection.pcovr import COHESIVE_ENERGY

    descriptors = (
        spec.get("descriptors")
        or made
        or [d for d in steps.store.descriptor_names() if d.startswith("cumulants-")]
    )
    if not descriptors:
        raise DfreError("[pcovr] has no descriptors: add [cumulants] or list descriptors = [...]")
    return [
        steps.pcovr(
            descriptor,
            target=spec.get("target", COHESIVE_ENERGY),
            energy_key=spec.get("energy_key", "energy"),
            mixing=float(spec.get("mixing", 0.5)),
            n_components=spec.get("components", 2),
            remove_outliers=spec.get("remove_outliers", False),
        )
        for descriptor in descriptors
    ]


def _report(store: Any, spec: dict, folder: str, runs: list[str], log: Callable[[str], None]):
    from dfre.report import DEFAULT_MIN_COUNT, make_report
    from dfre.report.chemiscope import export_chemiscope

    out = os.path.normpath(os.path.join(folder, spec.get("out", "report")))
    report = make_report(
        store, out, runs or None, min_count=spec.get("min_count", DEFAULT_MIN_COUNT)
    )
    if "chemiscope" in spec:
        summary = export_chemiscope(
            store,
            os.path.join(folder, spec["chemiscope"]),
            max_structures=spec.get("max_structures"),
        )
        log(f"chemiscope: {summary['path']} ({summary['structures']} structures)")
    return report.html


def summary_text(made: dict[str, Any], seconds: float) -> list[str]:
    """The closing summary of a study run: stages with their times, masked atoms, report."""
    from dfre.progress import duration

    lines = [f"done in {duration(seconds)}:"]
    width = max((len(s["name"]) for s in made["stages"]), default=8)
    for stage in made["stages"]:
        done = []
        if stage["computed"]:
            done.append(f"{stage['computed']} computed")
        if stage["reused"]:
            done.append(f"{stage['reused']} up to date, reused")
        notes = [*stage["notes"], *([", ".join(done)] if done else [])]
        lines.append(
            f"  {stage['name']:<{width}}  {duration(stage['seconds']):>11}  {stage['what']}"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    masked = made.get("masked")
    if masked:
        from dfre.studies.steps import masked_text

        lines.append("masked: atoms a model cannot handle, left out of its comparisons:")
        lines += [f"  {masked_text(record)}" for record in masked]
    elif masked is not None:
        lines.append("masked: no atoms (every model handled every structure)")
    lines.append(
        f"store {made['store']}: {len(made['results'])} results, "
        f"{len(made['descriptors'])} descriptors"
    )
    if "report" in made:
        lines.append(f"report: {made['report']}")
    return lines
