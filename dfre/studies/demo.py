"""The demo study: every shipped model on the embedded sample dataset (``dfre demo``).

The study itself is the TOML file ``demo.toml`` of this package, run by the study runner
(:func:`dfre.studies.run_study`). :func:`write_demo_study` resolves it for one run:

- ``store`` and the report folder become the paths given (relative ones against the
  current directory); the resolved file is written into the report folder as
  ``study.toml``, so ``dfre run <report>/study.toml`` repeats the run;
- ``atoms``: size of the sample dataset; every ``stratified:N`` selection is capped at
  ``atoms // 4`` test environments so small runs keep three quarters for training;
- ``models``: a subset of the demo's models; comparisons keep only those models'
  feature sets and are dropped when fewer than two remain, cumulants fall back to the
  last layer of the first model chosen.

Re-running on the same store is resumable: an interrupted sample resumes (see
:func:`dfre.data.write_sample`), featurize computes only missing chunks, and analyses
whose inputs and settings are unchanged are reused, so a finished demo re-run only writes
the report.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from dfre.errors import DfreError, did_you_mean

#: The study file shipped with the package.
DEMO_FILE = "demo.toml"
#: Name of the resolved study file written into the report folder.
RESOLVED_NAME = "study.toml"
#: Smallest sample the demo accepts (LFRE needs more training rows than neighbours).
MIN_ATOMS = 150


def demo_study_text() -> str:
    """The text of the embedded demo study file."""
    return resources.files("dfre.studies").joinpath(DEMO_FILE).read_text(encoding="utf-8")


def demo_models() -> list[str]:
    """The models of the embedded demo study, in order."""
    return list(tomllib.loads(demo_study_text())["features"]["models"])


def demo_defaults() -> dict[str, Any]:
    """Default store, report folder and atoms of the embedded demo study."""
    data = tomllib.loads(demo_study_text())
    return {
        "store": data["store"],
        "out": data["report"]["out"],
        "atoms": data["dataset"]["sample_atoms"],
    }


def resolve_demo_study(
    *,
    atoms: int | None = None,
    models: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The demo study as a dict, for ``atoms`` sample atoms and the chosen ``models``."""
    data = tomllib.loads(demo_study_text())
    atoms = data["dataset"]["sample_atoms"] if atoms is None else int(atoms)
    if atoms < MIN_ATOMS:
        raise DfreError(f"--atoms {atoms} is too small for the demo: give at least {MIN_ATOMS}")
    data["dataset"]["sample_atoms"] = atoms
    known = data["features"]["models"]
    chosen = list(known if not models else models)
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise DfreError(
            f"--models: {', '.join(unknown)} not in the demo{did_you_mean(unknown[0], known)}; "
            f"choose from {', '.join(known)}"
        )
    if len(set(chosen)) != len(chosen):
        raise DfreError(f"--models repeats a model: {','.join(chosen)}")
    data["features"]["models"] = chosen

    def kept(names: list[str]) -> list[str]:
        return [n for n in names if n.split("/")[0] in chosen]

    max_test = atoms // 4
    compares = []
    for compare in data.get("compare", []):
        compare["features"] = kept(compare["features"])
        if len(compare["features"]) < 2:
            continue
        kind, _, size = compare.get("selection", "").partition(":")
        if kind == "stratified" and int(size) > max_test:
            compare["selection"] = f"stratified:{max_test}"
        compares.append(compare)
    data["compare"] = compares
    cumulants = data.get("cumulants")
    if cumulants is not None:
        cumulants["features"] = kept(cumulants["features"]) or [f"{chosen[0]}/ll"]
    return data


def write_demo_study(
    store: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    atoms: int | None = None,
    models: Sequence[str] | None = None,
) -> str:
    """Write the resolved demo study into the report folder ``out``; return its path.

    ``store`` and ``out`` default to the study's ``demo-store.zarr`` and ``demo-report``
    in the current directory.
    """
    import tomli_w

    defaults = demo_defaults()
    data = resolve_demo_study(atoms=atoms, models=models)
    store = os.path.abspath(store or defaults["store"])
    out = os.path.abspath(out or defaults["out"])
    if os.path.isfile(out):
        raise DfreError(f"report folder {out} is a file: give a directory with --out")
    if os.path.isfile(store):
        raise DfreError(f"store {store} is a file: give a directory with --store")
    _check_store_sample(store, data["dataset"])
    os.makedirs(out, exist_ok=True)
    data["store"] = os.path.relpath(store, out)
    data["report"]["out"] = "."
    path = os.path.join(out, RESOLVED_NAME)
    header = (
        "# The demo study as run by `dfre demo` (from dfre/studies/demo.toml);\n"
        f"# repeat it with: dfre run {path}\n\n"
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header + tomli_w.dumps(data))
    return path


def _check_store_sample(store: str, dataset: dict[str, Any]) -> None:
    """A store that exists must hold the demo's sample (same atoms, seed and subset
    weights), nothing else."""
    from dfre.data.sample import sample_source
    from dfre.store import Store

    if not (os.path.isdir(store) and _has_data(store)):
        return
    source = sample_source(dataset["seed"], dataset["sample_atoms"], subsets=dataset.get("subsets"))
    sources = [r.get("source") for r in Store.open(store).provenance]
    if sources != [source]:
        held = ", ".join(str(s) for s in sources) or "no structures"
        raise DfreError(
            f"store {store} holds {held}, not the demo sample '{source}': give the same "
            "--atoms as when it was made, or a new --store"
        )


def _has_data(path: str) -> bool:
    from dfre.lock import LOCK_NAME

    return any(entry != LOCK_NAME for entry in os.listdir(path))


def run_demo(
    store: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    atoms: int | None = None,
    models: Sequence[str] | None = None,
    log: Any = print,
    cluster: Any = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the demo study; return what :func:`run_study` made.

    ``cluster`` and ``force`` are those of :func:`run_study` (default: the active Dask
    scheduler). An interrupted sample in an existing store is completed first (the
    study runner only builds a dataset into a new store).
    """
    from dfre.data.sample import write_sample
    from dfre.studies.config import load_study, run_study

    path = write_demo_study(store, out, atoms=atoms, models=models)
    study = load_study(path)
    dataset = study.get("dataset")
    if os.path.isdir(study.store) and _has_data(study.store):
        write_sample(
            study.store, dataset["sample_atoms"], dataset["seed"], subsets=dataset.get("subsets")
        )
    made = run_study(study, log=log, cluster=cluster, force=force)
    made["store"] = os.path.normpath(made["store"])
    if "report" in made:
        made["report"] = os.path.normpath(made["report"])
    made["study"] = path
    return made
