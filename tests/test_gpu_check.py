"""benchmarks/gpu_check.sh: the prepared GPU check, run here as its CPU dry run.

``--dry-run`` runs every step of the check (environment and import chain, the GPU tests
in their CPU mode, the GFRE, featurize and LFRE benchmarks) at tiny sizes on numpy and a
LocalCluster, so the script the GPU machine will run one day cannot rot unnoticed. The
step runner's own contract -- a step that fails or runs out of time is recorded and the
next one still runs, the JSON is written after every step -- is tested with small
commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(tmp / "out"), PYTHON=sys.executable, TMPDIR=str(tmp))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (tmp / "out" / "gpu-check.log").read_text()
    result = json.loads((tmp / "out" / "gpu-check.json").read_text())
    return proc, result, log


def test_dry_run_passes_every_step(dry_run):
    proc, result, log = dry_run
    assert proc.returncode == 0, log[-3000:]
    assert result["mode"].startswith("dry-run") and result["failed_steps"] == []
    steps = result["steps"]
    assert list(steps) == ["install", "environment", "tests", "gfre", "featurize", "lfre"]
    assert steps["install"]["status"] in ("ok", "skipped")  # skipped without .whl/
    for name in ("environment", "tests", "gfre", "featurize", "lfre"):
        assert steps[name]["status"] == "ok", name
        assert f"===== {name}: ok after" in log


def test_dry_run_imports_only_carried_wheels_and_machine_packages(dry_run):
    environment = dry_run[1]["steps"]["environment"]["figures"]
    assert environment["problems"] == []
    assert environment["imported"]["outside"] == {}
    carried = set(environment["imported"]["carried"])
    assert {"dask", "distributed", "zarr", "chgnet", "sevenn", "pymatgen-core"} <= carried


def test_dry_run_ran_the_gpu_tests_in_cpu_mode(dry_run):
    tests = dry_run[1]["steps"]["tests"]["tests"]
    outcomes = {name: t["outcome"] for name, t in tests.items()}
    assert outcomes.pop("test_lfre_on_workers_with_an_rmm_pool") == "skipped"
    assert len(outcomes) >= 8 and set(outcomes.values()) == {"passed"}
    assert "test_featurize_on_the_cluster_equals_cpu_features[chgnet-0.3.0]" in outcomes


def test_dry_run_benchmark_figures(dry_run):
    steps = dry_run[1]["steps"]
    gfre = steps["gfre"]["figures"]
    assert np.isfinite(gfre["matrix"]).all() and np.shape(gfre["matrix"]) == (4, 4)
    assert gfre["effective_tflops"] > 0 and gfre["gemm_tflops"] > 0
    assert gfre["fraction_of_gemm"] == pytest.approx(gfre["effective_tflops"] / gfre["gemm_tflops"])
    lfre = steps["lfre"]["figures"]
    assert lfre["knn_queries"] == lfre["n_envs"] == lfre["n_test"]  # k-fold: all queried once
    assert lfre["ridge_neighbourhoods_per_s"] > 0 and np.isfinite(lfre["matrix"][0][1])
    (run,) = steps["featurize"]["figures"]["runs"]
    assert run["model"] == "sevennet-0" and run["pipeline"] > 0 and run["max_diff"] <= 1e-5
    targets = dry_run[1]["targets"]
    assert targets["featurize_pipeline_over_raw >= 0.8"] is None  # no raw forward on CPU
    assert isinstance(targets["gfre_fraction_of_gemm >= 0.5"], bool)


def test_failed_and_timed_out_steps_are_recorded_and_the_next_runs(tmp_path, monkeypatch):
    py = sys.executable
    fake = [
        gpu_check.Step("fails", 30, [py, "-c", "import sys; print('broken'); sys.exit(3)"]),
        gpu_check.Step("hangs", 1, [py, "-c", "import time; time.sleep(60)"]),
        gpu_check.Step(
            "works",
            30,
            [py, "-c", f"open({str(tmp_path / 'w.json')!r}, 'w').write('{{\"x\": 1}}')"],
            tmp_path / "w.json",
        ),
    ]
    monkeypatch.setattr(gpu_check, "steps", lambda work, dry_run: fake)
    args = ["run", "--out", str(tmp_path / "out"), "--work", str(tmp_path)]
    assert gpu_check.main(args) == 1
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    steps = result["steps"]
    assert steps["fails"]["status"] == "failed" and steps["fails"]["returncode"] == 3
    assert steps["hangs"]["status"] == "timeout" and steps["hangs"]["seconds"] < 20
    assert steps["works"] == {**steps["works"], "status": "ok", "figures": {"x": 1}}
    assert result["failed_steps"] == ["fails", "hangs"]
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "broken" in log and "===== hangs: timeout" in log


def test_steps_are_skipped_when_the_budget_is_spent(tmp_path, monkeypatch):
    fake = [gpu_check.Step("late", 30, [sys.executable, "-c", "pass"])]
    monkeypatch.setattr(gpu_check, "steps", lambda work, dry_run: fake)
    args = ["run", "--out", str(tmp_path), "--work", str(tmp_path), "--budget", "12"]
    assert gpu_check.main([*args, "--started", "0"]) == 0  # started long ago
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["steps"]["late"] == {"status": "skipped", "reason": "no time left"}
