"""The steps of ``benchmarks/gpu_check.sh``: each with its own time limit, one JSON.

``run`` executes the steps in order, each in its own process group with a time limit
that also respects the whole check's deadline (``--budget`` seconds from the start of
``gpu_check.sh``); a step that fails or runs out of time is recorded and the next one
starts. After every step ``$OUT/gpu-check.json`` is rewritten (so a check killed from
outside still leaves what it had) and the step's output is appended to
``$OUT/gpu-check.log``.

Steps (GPU sizes; ``--dry-run`` runs the same on the CPU at tiny sizes):

- ``environment`` (``probe``): versions, the GPU, and the import chain: every dfre
  module, the CHGNet and SevenNet models run once, GFRE/LFRE/cumulants once; the
  distributions imported must all be carried wheels (``benchmarks/gpu_wheels.py``) or
  packages of the GPU machine (``benchmarks/gpu/machine-packages.txt``);
- ``tests``: ``tests/test_gpu.py`` (CuPy equals numpy to 1e-10, featurize on a
  LocalCUDACluster equals the CPU to 1e-5, an RMM pool);
- ``gfre``: ``bench_gfre.py``, 4x4 at 2,000,000 rows, paper dimensions, data in GPU
  memory, against the float64 GEMM rate measured on the same device;
- ``featurize``: ``bench_featurize.py``, SevenNet-0 on a LocalCUDACluster against the
  raw batched forward of the same run;
- ``lfre``: ``bench_lfre.py``, full-dataset LFRE at 1,000,000 environments, 512 -> 128,
  k = 128, 2 folds (last: the one whose time is least known; ``--only lfre`` reruns it
  alone with the whole budget).

The JSON's ``targets`` compare the figures with the issue's targets (GFRE >= 50% of the
GEMM rate, LFRE <= 600 s at 1M environments (stretch 60 s), featurize >= 80% of the raw
forward rate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Seconds kept back from every step for writing the results.
RESERVE = 5


@dataclass
class Step:
    name: str
    budget: float  # seconds at most
    command: list[str]
    figures: Path | None = None  # JSON the step writes


def steps(work: Path, dry_run: bool) -> list[Step]:
    """The check's steps: GPU sizes, or tiny CPU ones for the dry run."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    probe = [py, str(ROOT / "benchmarks" / "gpu_check.py"), "probe", "--json"]
    gfre = ["--n-envs", "2000000", "--chunk-rows", "262144", "--threads", "4"]
    lfre = ["--n-envs", "1000000", "--dims", "512", "128", "--k", "128"]
    featurize = ["--sevennet-atoms", "40000", "--batch-atoms", "8192"]
    if dry_run:
        gfre = ["--n-envs", "3000", "--dims", "14,51,24,12", "--test", "300", "--threads", "2"]
        gfre += ["--chunk-rows", "16384", "--pass-rate"]
        lfre = ["--n-envs", "1500", "--dims", "51", "12", "--k", "12", "--threads", "2"]
        featurize = ["--sevennet-atoms", "40", "--batch-atoms", "64", "--workers", "1"]
        featurize += ["--warm-atoms", "10", "--in-process"]
    bench = ROOT / "benchmarks"
    return [
        Step(
            "environment", 60, [*probe, str(work / "environment.json")], work / "environment.json"
        ),
        Step(
            "tests",
            150,
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                str(ROOT / "tests" / "test_gpu.py"),
            ]
            + ["--junitxml", str(work / "tests.xml")],
        ),
        Step(
            "gfre",
            90,
            [py, str(bench / "bench_gfre.py"), "--device", device, "--reference-pairs", "0", *gfre]
            + ["--json", str(work / "gfre.json")],
            work / "gfre.json",
        ),
        Step(
            "featurize",
            100,
            [py, str(bench / "bench_featurize.py"), "--device", device, "--models", "sevennet-0"]
            + [*featurize, "--json", str(work / "featurize.json")],
            work / "featurize.json",
        ),
        Step(
            "lfre",
            180,
            [py, str(bench / "bench_lfre.py"), "--full-dataset", "--folds", "2", *lfre]
            + ["--pairs", "0-1", "--device", device, "--reference-points", "0"]
            + ["--json", str(work / "lfre.json")],
            work / "lfre.json",
        ),
    ]


# ---------------------------------------------------------------------- running steps
def run_step(step: Step, timeout: float, log: Path, env: dict) -> dict:
    """Run ``step`` for at most ``timeout`` seconds in its own process group."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as out:
        out.write(f"\n===== {step.name}: {' '.join(step.command)} (limit {timeout:.0f} s)\n")
        out.flush()
        proc = subprocess.Popen(
            step.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            code, status = None, "timeout"
        seconds = time.perf_counter() - started
        out.write(f"===== {step.name}: {status} after {seconds:.1f} s (exit code {code})\n")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "status": status,
        "returncode": code,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),  # of the processes the step waited for
    }


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, SIGKILL 10 s later if it is still there."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def junit_results(path: Path) -> dict:
    """Per-test outcome ("passed", "failed", "error", "skipped") and failure messages."""
    if not path.is_file():
        return {}
    tests = {}
    for case in ElementTree.parse(path).iter("testcase"):
        name = case.get("name")
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (found.get("message") or "")[:500]
        tests[name] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
        if message:
            tests[name]["message"] = message
    return tests


def targets(result: dict) -> dict:
    """The issue's targets against the figures that came back (None: not measured)."""
    steps_ = result["steps"]
    gfre = steps_.get("gfre", {}).get("figures", {})
    lfre = steps_.get("lfre", {}).get("figures", {})
    runs = steps_.get("featurize", {}).get("figures", {}).get("runs", [])
    ratio = max((r["pipeline_over_raw"] for r in runs if r.get("pipeline_over_raw")), default=None)
    fraction = gfre.get("fraction_of_gemm")
    seconds = lfre.get("seconds")
    return {
        "gfre_fraction_of_gemm >= 0.5": None if fraction is None else fraction >= 0.5,
        "lfre_1M_seconds <= 600": None if seconds is None else seconds <= 600,
        "lfre_1M_seconds <= 60 (stretch)": None if seconds is None else seconds <= 60,
        "featurize_pipeline_over_raw >= 0.8": None if ratio is None else ratio >= 0.8,
    }


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    log, json_path = out_dir / "gpu-check.log", out_dir / "gpu-check.json"
    deadline = args.started + args.budget
    env = dict(os.environ)
    if args.dry_run:
        env["DFRE_GPU_CHECK"] = "dry-run"
    env["PYTHONUNBUFFERED"] = "1"
    install = json.loads(Path(args.install).read_text()) if args.install else None
    result = {
        "mode": "dry-run (CPU, tiny sizes)" if args.dry_run else "gpu",
        "budget_s": args.budget,
        "steps": {"install": install} if install else {},
    }
    only = set(args.only.split(",")) if args.only else None
    for step in steps(work, args.dry_run):
        if only and step.name not in only:
            continue
        left = deadline - time.time() - RESERVE
        if left < 10:
            result["steps"][step.name] = {"status": "skipped", "reason": "no time left"}
            continue
        record = run_step(step, min(step.budget, left), log, env)
        if step.figures is not None and step.figures.is_file():
            record["figures"] = json.loads(step.figures.read_text())
        if step.name == "tests":
            record["tests"] = junit_results(work / "tests.xml")
        result["steps"][step.name] = record
        result["targets"] = targets(result)
        result["seconds"] = round(time.time() - args.started, 1)
        json_path.write_text(json.dumps(result, indent=1))
    failed = [n for n, r in result["steps"].items() if r and r["status"] not in ("ok", "skipped")]
    result["failed_steps"] = failed
    result["seconds"] = round(time.time() - args.started, 1)
    result["targets"] = targets(result)
    json_path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("mode", "seconds", "failed_steps", "targets")}))
    return 1 if failed else 0


# ---------------------------------------------------------------------- the environment
#: Imported only by Python < 3.12 (dask's importlib_metadata backport and its needs).
PY311_BACKPORTS = {"importlib-metadata", "zipp", "lazy-importer"}
#: Imported when present, skipped when not: tabulate's width table; PySocks, which
#: requests/urllib3 import for their SOCKS proxy support when it is installed (here it
#: comes with selenium, the report's browser test).
OPTIONAL_IMPORTS = {"wcwidth", "pysocks"}
VERSIONS = (
    "numpy",
    "scipy",
    "torch",
    "cupy-cuda13x",
    "cupy-cuda12x",
    "dask",
    "distributed",
    "dask-cuda",
    "rmm-cu13",
    "zarr",
    "ase",
    "scikit-learn",
    "skmatter",
    "chgnet",
    "sevenn",
    "pymatgen-core",
    "e3nn",
    "torch-geometric",
    "pandas",
)


def _exercise(gpu: bool) -> None:
    """Import every dfre module and run each engine and the two shipped models once."""
    import importlib
    import pkgutil

    import ase.build
    import numpy as np

    import dfre
    from dfre.descriptors.cumulants import structure_cumulants
    from dfre.metrics import gfre_matrix
    from dfre.metrics.lfre import lfre_matrix
    from dfre.models.base import load_extractor

    optional = {"mace", "uma", "dpa", "metatomic"}  # model families with their own packages
    for module in pkgutil.walk_packages(dfre.__path__, "dfre."):
        if module.name != "dfre.__main__" and module.name.split(".")[-1] not in optional:
            importlib.import_module(module.name)
    if gpu:
        import cupyx.lapack  # noqa: F401
        import dask_cuda  # noqa: F401
        import rmm  # noqa: F401
    atoms = ase.build.bulk("Si", cubic=True)
    for model in ("chgnet-0.3.0", "sevennet-0"):
        load_extractor(model, "cuda" if gpu else "cpu").featurize([atoms], ["bb", "ll"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = np.tanh(x @ rng.normal(size=(5, 3)))
    split = (np.arange(200), np.arange(200, 300))
    gfre_matrix([x, y], split)
    lfre_matrix([x, y], split, 8)
    structure_cumulants(x, [0, 100, 300], 3)


def imported_distributions() -> dict[str, list[str]]:
    """Distribution name -> the top-level modules of it that are imported now."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    found: dict[str, list[str]] = {}
    for name in sorted(sys.modules):
        if "." in name:
            continue
        for dist in owners.get(name, []):
            found.setdefault(dist, []).append(name)
    return found


def probe(args: argparse.Namespace) -> int:
    import importlib.metadata
    import platform

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_wheels import PINS, machine_packages, normalise

    info: dict = {"python": platform.python_version(), "machine": platform.machine()}
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    from dfre.linalg.backend import gpu_available

    gpu = gpu_available()
    info["gpu_available"] = gpu
    if gpu:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = {
            "name": props["name"].decode(),
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        }
    problems = []
    try:
        _exercise(gpu)
    except Exception as error:  # recorded: the point of this step is to find such errors
        problems.append(f"{type(error).__name__}: {error}")
    carried = {normalise(k) for k in PINS}
    machine = machine_packages()
    allowed = OPTIONAL_IMPORTS | (PY311_BACKPORTS if sys.version_info < (3, 12) else set())
    imported = imported_distributions()
    outside = {
        dist: modules
        for dist, modules in imported.items()
        if normalise(dist) not in carried | machine | allowed | {"dfre"}
    }
    info["imported"] = {
        "carried": sorted(d for d in imported if normalise(d) in carried),
        "machine": sorted(d for d in imported if normalise(d) in machine),
        "allowed_here": sorted(d for d in imported if normalise(d) in allowed),
        "outside": outside,
    }
    if outside:
        problems.append(f"imported but neither carried nor on the GPU machine: {sorted(outside)}")
    info["problems"] = problems
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the steps (called by gpu_check.sh)")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--out", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--started", type=float, default=time.time(), help="epoch seconds")
    r.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    r.add_argument("--install", help="JSON file with the wheel installation's outcome")
    r.add_argument("--only", help="comma-separated steps to run (default: all)")
    q = sub.add_parser("probe", help="the environment step")
    q.add_argument("--json", required=True)
    args = p.parse_args(argv)
    return run(args) if args.command == "run" else probe(args)


if __name__ == "__main__":
    sys.exit(main())
