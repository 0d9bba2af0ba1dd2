"""dfre on a real single-node SLURM: `dfre cluster start --jobqueue slurm` submits Dask
worker jobs with sbatch (dask-jobqueue's SLURMCluster), the workers join, a store-backed
computation connected through the scheduler file runs on them and equals the local run,
and stopping the command cancels the jobs.

SLURM and munge come from Debian packages (.ci/run installs slurm-wlm and munge) and are
started and stopped by deploy/local-slurm/{start,stop}.sh, which stop exactly the
daemons they started, by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client
from test_cluster import gram_reduction, make_store, stop, wait_for_file

from dfre import cluster

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = ROOT / "deploy" / "local-slurm"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def local_slurm():
    """A running single-node SLURM for the session (skipped only where SLURM is absent)."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not installed: apt-get install -y slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("starting the local SLURM daemons needs root (as in CI)")
    started = subprocess.run(
        ["sh", str(LOCAL_SLURM / "start.sh")], capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        pytest.fail(f"deploy/local-slurm/start.sh failed: {started.stderr.strip()}")
    yield
    subprocess.run(["sh", str(LOCAL_SLURM / "stop.sh")], capture_output=True, timeout=120)


def squeue(*job_ids: str) -> list[str]:
    """States of our jobs still known to SLURM."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if line.strip()]


def write_config(folder: Path) -> Path:
    """Jobs of one core and 1 GB on the loopback interface, logs kept in ``folder``."""
    config = folder / "jobqueue.yaml"
    config.write_text(
        "jobqueue:\n  slurm:\n    cores: 1\n    memory: 1GB\n    processes: 1\n"
        "    walltime: '00:10:00'\n    interface: lo\n    death-timeout: 30\n"
        f"    python: {sys.executable}\n    log-directory: {folder / 'logs'}\n"
    )
    return config


def test_cluster_start_runs_dfre_on_slurm_jobs(local_slurm, tmp_path):
    store_path = tmp_path / "store.zarr"
    make_store(store_path, n_structures=200, seed=3)
    expected = dask.compute(*gram_reduction(store_path), scheduler="sync")

    config = write_config(tmp_path)
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster-start.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "dfre"), "cluster", "start", "--jobqueue", "slurm",
            "--config", str(config), "--workers", "2",
            "--scheduler-file", str(scheduler_file), "--dashboard-address", ":0",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    job_ids: list[str] = []
    try:
        wait_for_file(scheduler_file, proc)
        with cluster.connected(scheduler_file=scheduler_file, quiet=True) as client:
            try:
                client.wait_for_workers(2, timeout=120)
            except TimeoutError:
                queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
                pytest.fail(f"workers did not join within 120 s; squeue:\n{queue}")
            # the workers are processes of SLURM jobs that sbatch submitted
            job_ids = sorted(set(client.run(os.getenv, "SLURM_JOB_ID").values()))
            assert len(job_ids) == 2 and all(job_ids)
            assert sorted(line.split()[1] for line in squeue(*job_ids)) == ["RUNNING"] * 2
            gram, sums = cluster.compute(*gram_reduction(store_path), label="gram on SLURM")
        np.testing.assert_allclose(gram, expected[0], rtol=1e-14, atol=1e-12)
        np.testing.assert_array_equal(sums, expected[1])

        os.kill(proc.pid, signal.SIGTERM)  # what Ctrl-C or the end of a batch job does
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while squeue(*job_ids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert squeue(*job_ids) == []  # jobs cancelled
        assert not scheduler_file.exists()
    finally:
        stop(proc)
        log.close()
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True)
    text = (tmp_path / "cluster-start.log").read_text()
    assert "2 workers connected" in text and "cluster stopped" in text


def test_adaptive_jobqueue_cluster_submits_jobs_for_work(local_slurm, tmp_path):
    """The library path: an adaptive cluster with no workers submits a job when work comes."""
    store_path = tmp_path / "store.zarr"
    make_store(store_path, n_structures=50, seed=4)
    _, sums = gram_reduction(store_path)
    (expected,) = dask.compute(sums, scheduler="sync")
    jobs = cluster.jobqueue_cluster(
        "slurm", write_config(tmp_path), scheduler_file=tmp_path / "s.json", dashboard_address=":0"
    )
    try:
        assert json.loads((tmp_path / "s.json").read_text())["address"] == jobs.scheduler_address
        jobs.adapt(minimum=0, maximum=1)
        with Client(jobs) as client:
            assert client.scheduler_info()["workers"] == {}
            (result,) = cluster.compute(sums, label="sums on an adaptive SLURM cluster")
            job_ids = [j for j in client.run(os.getenv, "SLURM_JOB_ID").values() if j]
        np.testing.assert_array_equal(result, expected)
        assert len(job_ids) == 1
    finally:
        jobs.close()
    deadline = time.monotonic() + 30
    while squeue(*job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue(*job_ids) == []


@pytest.mark.filterwarnings("ignore::dfre.descriptors.cumulants.CumulantNotice")
def test_sbatch_study_script_runs_a_dfre_command(local_slurm, tmp_path):
    """deploy/slurm/study.sbatch on CPU: scheduler + 2 srun workers + `dfre cumulants`."""
    from dfre.descriptors.cumulants import compute_cumulants
    from dfre.store import Store

    store_path = tmp_path / "store.zarr"
    make_store(store_path, n_structures=120, seed=5)
    local_path = tmp_path / "local.zarr"
    shutil.copytree(store_path, local_path)
    local = Store.open(local_path, mode="r+")
    with dask.config.set(scheduler="sync"):
        name = compute_cumulants(local, "model-a/bb", 3)

    out = tmp_path / "study.out"
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
            "--mem-per-cpu=1G", "--gpus-per-node=0", f"--output={out}", f"--chdir={tmp_path}",
            f"--export=ALL,DFRE_GPU=0,DFRE_SCHEDULER_PORT=0,DFRE_DASHBOARD_ADDRESS=:0,"
            f"DFRE_INTERFACE=lo,PATH={BIN}:{os.environ['PATH']}",
            str(ROOT / "deploy" / "slurm" / "study.sbatch"),
            "cumulants", "--store", str(store_path), "--features", "model-a/bb", "--order", "3",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 120
        while squeue(job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert squeue(job_id) == [], "the study job did not finish within 120 s"
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    state = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True
    ).stdout  # fmt: skip
    log = out.read_text()
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, log[-3000:]
    assert "workers 2" in log
    assert f"model-a/bb -> descriptors/{name}" in log
    np.testing.assert_allclose(
        Store.open(store_path).descriptor(name), local.descriptor(name), rtol=1e-12, atol=1e-12
    )


def test_refused_worker_job_is_a_one_line_error(local_slurm, tmp_path, capsys):
    from dfre.cli import main

    config = tmp_path / "jobqueue.yaml"
    config.write_text(
        "jobqueue:\n  slurm:\n    cores: 1\n    memory: 1GB\n    queue: no-such-partition\n"
        "    interface: lo\n"
    )
    scheduler_file = tmp_path / "scheduler.json"
    code = main(
        ["cluster", "start", "--jobqueue", "slurm", "--config", str(config), "--workers", "1",
         "--scheduler-file", str(scheduler_file), "--dashboard-address", ":0"]
    )  # fmt: skip
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dfre:")]
    assert errors == [errors[0]] and errors[0].startswith("dfre: error: sbatch refused")
    assert "invalid partition" in errors[0].lower()
    assert not scheduler_file.exists()


# ---------------------------------------------------------------------- keeping the worker jobs
def example_config(folder: Path, **overrides) -> Path:
    """deploy/jobqueue/slurm.yaml as shipped (so no ``interface``: this host's address),
    with the site-specific keys set for this one-node SLURM."""
    import yaml

    document = yaml.safe_load((ROOT / "deploy" / "jobqueue" / "slurm.yaml").read_text())
    section = document["jobqueue"]["slurm"]
    assert "interface" not in section
    section.update(
        {
            "cores": 1, "memory": "1GB", "processes": 1, "queue": None, "walltime": "00:10:00",
            "death-timeout": 30, "python": sys.executable, "local-directory": str(folder),
            "log-directory": str(folder / "logs"), "job-script-prologue": [], **overrides,
        }
    )  # fmt: skip
    config = folder / "slurm.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def worker_job_ids(client) -> set[str]:
    try:
        return set(client.run(os.getenv, "SLURM_JOB_ID", on_error="ignore").values())
    except OSError:  # a worker went away while asked
        return set()


def test_lost_worker_jobs_are_replaced(local_slurm, tmp_path):
    """scancel of one of two worker jobs (as at the end of its wall time): the cluster logs
    it and submits a replacement, whose worker joins; the example config runs as shipped
    on a machine without ib0."""
    config = example_config(tmp_path)
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster-start.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "dfre"), "cluster", "start", "--jobqueue", "slurm", "--config", str(config),
         "--workers", "2", "--scheduler-file", str(scheduler_file), "--dashboard-address", ":0",
         "--check-every", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    seen: set[str] = set()
    try:
        wait_for_file(scheduler_file, proc)
        with cluster.connected(scheduler_file=scheduler_file, quiet=True) as client:
            client.wait_for_workers(2, timeout=120)
            first = sorted(worker_job_ids(client))
            assert len(first) == 2 and all(first)
            seen.update(first)
            subprocess.run(["scancel", first[0]], check=True)
            deadline = time.monotonic() + 120
            while True:
                ids = worker_job_ids(client)
                seen.update(ids)
                if len(ids) == 2 and first[0] not in ids and first[1] in ids:
                    break
                assert time.monotonic() < deadline, f"no replacement joined: {ids}"
                time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop(proc)
        log.close()
        subprocess.run(["scancel", *seen], capture_output=True)
    text = (tmp_path / "cluster-start.log").read_text()
    assert f"dfre cluster: worker job {first[0]} (" in text, text
    assert "ended after its workers had joined" in text
    assert "dfre cluster: submitting 1 replacement job(s) to keep 2 jobs" in text
    deadline = time.monotonic() + 30
    while squeue(*seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue(*seen) == []


def test_worker_jobs_that_keep_failing_stop_the_cluster(local_slurm, tmp_path):
    config = example_config(tmp_path, **{"job-script-prologue": ["exit 3"]})
    scheduler_file = tmp_path / "scheduler.json"
    done = subprocess.run(
        [str(BIN / "dfre"), "cluster", "start", "--jobqueue", "slurm", "--config", str(config),
         "--workers", "1", "--scheduler-file", str(scheduler_file), "--dashboard-address", ":0",
         "--check-every", "1", "--max-job-failures", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "dfre: error: 2 worker jobs in a row ended before their workers joined (last: job "
    ), done.stderr
    assert lines[0].endswith(
        f"see their logs in {tmp_path / 'logs'} and fix the jobqueue config or the job "
        "environment; the cluster stops"
    )
    failed = [
        line for line in done.stdout.splitlines() if "before any of its workers joined" in line
    ]
    assert len(failed) == 2, done.stdout
    assert "submitting 1 replacement job(s) to keep 1 jobs" in done.stdout
    assert not scheduler_file.exists()
