"""The cluster layer against a real `dask scheduler` and two `dask worker` processes.

A store-backed reduction (float64 Gram matrix and column sums of two feature sets read
from a real Zarr store) computed on the external cluster -- reached by address, by
scheduler file and through DASK_SCHEDULER_ADDRESS -- must equal the same computation
on dfre's default local cluster: the column sums bit for bit (the graph fixes the order
of every sum), the Gram matrix to the last bits (numpy's matmul picks BLAS or its own
loop depending on how a transferred chunk is aligned in memory, a 1-ulp difference).
Bad input (unreachable or stale scheduler, GPU where none exists, jobqueue configs)
must give one-line errors.
"""

from __future__ import annotations

import json
import operator
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dfre import cluster
from dfre.cli import main
from dfre.errors import DfreError
from dfre.store import Store, StructureBlock

BIN = Path(sys.executable).parent
FEATURES = {"model-a/bb": 7, "model-b/ll": 4}


# ---------------------------------------------------------------------- helpers
def make_store(path: Path, n_structures: int = 300, seed: int = 0) -> Store:
    """A real store: structures of 1-12 atoms, two random float32 feature sets."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 13, n_structures)
    n = int(counts.sum())
    store = Store.create(path, chunk_atoms=256)
    store.append(
        StructureBlock(
            numbers=rng.integers(1, 30, n).astype(np.int16),
            positions=rng.normal(size=(n, 3)),
            counts=counts,
            cell=np.zeros((n_structures, 3, 3)),
            pbc=np.zeros((n_structures, 3), bool),
        )
    )
    for name, dim in FEATURES.items():
        store.create_feature(name, dim)[:] = rng.normal(size=(n, dim)).astype(np.float32)
    return store


def gram_reduction(store_path: Path):
    """Lazy float64 Gram matrix X^T X and column sums of the concatenated feature sets."""
    store = Store.open(store_path)
    x = da.concatenate([store.features(n).astype(np.float64) for n in FEATURES], axis=1)
    return x.T @ x, x.sum(axis=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:2]} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {seconds} s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    """Stop one process we started, by its PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def start_scheduler(scheduler_file: Path, log, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
            "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file), *extra,
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_file(scheduler_file, proc)
    return proc


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real scheduler and two worker processes on 127.0.0.1: (address, scheduler file)."""
    folder = tmp_path_factory.mktemp("dask-cluster")
    scheduler_file = folder / "scheduler.json"
    log = open(folder / "log.txt", "w")
    procs = [start_scheduler(scheduler_file, log)]
    try:
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "dask"),
                        "worker",
                        "--scheduler-file",
                        str(scheduler_file),
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        "1",
                        "--memory-limit",
                        "1GiB",
                        "--no-dashboard",
                        "--name",
                        f"test-worker-{i}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, scheduler_file
    finally:
        for proc in reversed(procs):
            stop(proc)
        log.close()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store.zarr"
    make_store(path)
    return path


@pytest.fixture(scope="module")
def local_result(store_path):
    """The reduction on dfre's default local cluster (no scheduler given)."""
    with cluster.connected(gpu=None, n_workers=2, dashboard_address=":0", quiet=True) as client:
        assert isinstance(client.cluster, LocalCluster)
        return cluster.compute(*gram_reduction(store_path), label="gram (local)")


@pytest.fixture(autouse=True)
def no_scheduler_env(monkeypatch):
    monkeypatch.delenv(cluster.SCHEDULER_ENV, raising=False)


# ---------------------------------------------------------------------- same results
def test_local_result_is_the_gram_matrix(store_path, local_result):
    store = Store.open(store_path)
    x = np.hstack([np.asarray(store.features(n), dtype=np.float64) for n in FEATURES])
    gram, sums = local_result
    np.testing.assert_allclose(gram, x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(sums, x.sum(axis=0), rtol=1e-12)


def check_connected(client, dask_cluster, store_path, local_result, capsys):
    address, _ = dask_cluster
    assert client.scheduler.address == address
    assert len(client.scheduler_info()["workers"]) == 2
    gram, sums = cluster.compute(*gram_reduction(store_path), label="gram pass")
    np.testing.assert_allclose(gram, local_result[0], rtol=1e-14, atol=1e-12)
    np.testing.assert_array_equal(sums, local_result[1])
    err = capsys.readouterr().err
    assert re.search(r"^\d\d:\d\d:\d\d dfre: Dask dashboard http://", err, flags=re.M)
    assert re.search(r"^\d\d:\d\d:\d\d dfre: gram pass: done in [\d.]+ s, \d+ tasks$", err,
                     flags=re.M)  # fmt: skip


def test_by_address(dask_cluster, store_path, local_result, capsys):
    with cluster.connected(dask_cluster[0]) as client:
        check_connected(client, dask_cluster, store_path, local_result, capsys)


def test_by_scheduler_file(dask_cluster, store_path, local_result, capsys):
    with cluster.connected(scheduler_file=dask_cluster[1]) as client:
        check_connected(client, dask_cluster, store_path, local_result, capsys)


def test_by_environment(dask_cluster, store_path, local_result, capsys, monkeypatch):
    monkeypatch.setenv(cluster.SCHEDULER_ENV, dask_cluster[0])
    with cluster.connected() as client:
        check_connected(client, dask_cluster, store_path, local_result, capsys)


def test_disconnect_leaves_external_cluster_running(dask_cluster):
    with cluster.connected(dask_cluster[0], quiet=True):
        pass
    with cluster.connected(dask_cluster[0], quiet=True) as client:
        assert len(client.scheduler_info()["workers"]) == 2


def test_cli_info_by_scheduler_file_with_performance_report(dask_cluster, tmp_path, capsys):
    report = tmp_path / "report.html"
    code = main(
        ["cluster", "info", "--scheduler-file", str(dask_cluster[1]),
         "--performance-report", str(report)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert f"scheduler {dask_cluster[0]}" in out
    assert "workers 2" in out and "test-worker-0" in out and "test-worker-1" in out
    assert report.exists() and "<html" in report.read_text()[:2000].lower()


def test_cli_info_honours_environment(dask_cluster, capsys, monkeypatch):
    monkeypatch.setenv(cluster.SCHEDULER_ENV, dask_cluster[0])
    assert main(["cluster", "info"]) == 0
    assert f"scheduler {dask_cluster[0]}" in capsys.readouterr().out


def test_local_cluster_sized_to_the_machine():
    import dask.system

    with cluster.connected(gpu=False, n_workers=2, dashboard_address=":0", quiet=True) as client:
        workers = client.scheduler_info()["workers"].values()
        assert isinstance(client.cluster, LocalCluster)
        assert len(workers) == 2
        assert all(w["nthreads"] == max(1, dask.system.CPU_COUNT // 2) for w in workers)
        malloc = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(malloc.values()) == {cluster.WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"]}


def test_worker_malloc_settings_yield_to_the_dask_config():
    environment = cluster.worker_environment()
    assert environment["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert str(environment["OMP_NUM_THREADS"]) == "1"  # Dask's own settings stay
    with dask.config.set({cluster.PRE_SPAWN: {"MALLOC_TRIM_THRESHOLD_": 1000}}):
        assert cluster.worker_environment() == {"MALLOC_TRIM_THRESHOLD_": 1000}


# ---------------------------------------------------------------------- progress
def test_progress_helpers_without_a_client(store_path, capsys):
    gram, sums = gram_reduction(store_path)
    (expected,) = cluster.compute(sums, label="sums", scheduler="sync")
    persisted = cluster.progress(sums, "sums persisted")
    np.testing.assert_array_equal(persisted.compute(scheduler="sync"), expected)
    err = capsys.readouterr().err
    assert re.search(r"dfre: sums: done in [\d.]+ s, \d+ tasks", err)
    assert "dfre: sums persisted: done in" in err


def test_progress_on_the_cluster_counts_tasks(dask_cluster, store_path, capsys):
    with cluster.connected(dask_cluster[0], quiet=True) as client:
        gram, _ = gram_reduction(store_path)
        persisted = cluster.progress(gram, "gram persisted")
        assert all(f.status == "finished" for f in client.futures_of(persisted))
        n_unoptimized = len(gram.__dask_graph__())
    err = capsys.readouterr().err
    match = re.search(r"dfre: gram persisted: done in [\d.]+ s, (\d+) tasks", err)
    assert match, err
    # every task of the (optimised) graph, not just the one output chunk
    assert gram.numblocks[0] * gram.numblocks[1] < int(match.group(1)) <= n_unoptimized


def test_gfre_draws_live_bars_on_an_external_cluster(dask_cluster, store_path, capsys, monkeypatch):
    """On a terminal, the GFRE passes show bars fed by the external scheduler itself."""
    from dfre.metrics.gfre import gfre_store

    monkeypatch.setattr("dfre.progress.REDRAW_SECONDS", 0.0)
    monkeypatch.setenv("DFRE_PROGRESS", "bar")
    with cluster.connected(scheduler_file=dask_cluster[1], quiet=True):
        gfre_store(Store.open(store_path, mode="r+"), list(FEATURES), "random:100", run="bars")
    err = capsys.readouterr().err
    bars = re.findall(r"GFRE statistics pass [^\r\n]*\[[#.]+\] (\d+)/(\d+) tasks \| [^\r\n]*ETA",
                      err)  # fmt: skip
    assert bars, err
    done, total = map(int, bars[-1])
    assert done == total > 1
    assert re.search(
        r"dfre: GFRE pointwise errors of 100 test rows: done in [\d.]+ s, \d+ tasks", err
    )


# ---------------------------------------------------------------------- bad input
def one_line_error(capsys) -> str:
    """The single error line of a failed command (after at most the dashboard line)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "dfre: Dask dashboard" not in line]
    assert len(lines) == 1 and lines[0].startswith("dfre: error: "), err
    return lines[0]


def test_unreachable_scheduler_times_out(capsys):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(DfreError, match=f"cannot reach the Dask scheduler at {address}.*2 s"):
        cluster.connect(address, timeout=2)
    assert time.monotonic() - start < 30  # bounded by the timeout, not a hang
    code = main(["cluster", "info", "--scheduler", address, "--scheduler-timeout", "1"])
    assert code == 2
    assert address in one_line_error(capsys)


def test_unreachable_environment_address(monkeypatch):
    monkeypatch.setenv(cluster.SCHEDULER_ENV, f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(DfreError, match=f"from {cluster.SCHEDULER_ENV}.*unset"):
        cluster.connect(timeout=1)


def test_missing_scheduler_file(tmp_path, capsys):
    path = tmp_path / "nowhere.json"
    assert main(["cluster", "info", "--scheduler-file", str(path)]) == 2
    line = one_line_error(capsys)
    assert f"scheduler file {path} does not exist" in line


def test_not_a_scheduler_file(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_text("{not json")
    with pytest.raises(DfreError, match="is not a Dask scheduler file"):
        cluster.connect(scheduler_file=path)


def test_stale_scheduler_file(tmp_path, capsys):
    """A scheduler killed without cleanup leaves its file behind: a clear error, no hang."""
    path = tmp_path / "scheduler.json"
    with open(tmp_path / "log.txt", "w") as log:
        proc = start_scheduler(path, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert path.exists()
    code = main(
        ["cluster", "info", "--scheduler-file", str(path), "--scheduler-timeout", "1"]
    )  # fmt: skip
    assert code == 2
    line = one_line_error(capsys)
    assert str(path) in line and "stale" in line


def test_scheduler_and_scheduler_file_together(tmp_path):
    with pytest.raises(DfreError, match="either --scheduler or --scheduler-file"):
        cluster.connect("tcp://127.0.0.1:1", tmp_path / "s.json")


def test_gpu_requested_without_gpu(capsys):
    if cluster.gpu_count():
        pytest.skip("this machine has a GPU that dask-cuda can use")
    with pytest.raises(DfreError, match="--gpu"):
        cluster.connect(gpu=True, dashboard_address=":0")
    assert main(["cluster", "info", "--gpu", "--dashboard-address", ":0"]) == 2
    assert "--gpu" in one_line_error(capsys)


def test_gpu_requested_on_cpu_workers(dask_cluster):
    with pytest.raises(DfreError, match="none of the 2 workers .* has a usable CUDA GPU"):
        cluster.connect(dask_cluster[0], gpu=True, quiet=True)


def test_rmm_pool_needs_a_local_gpu_cluster(capsys):
    with pytest.raises(DfreError, match="--rmm-pool-size needs GPU workers, but --no-gpu"):
        cluster.connect(gpu=False, rmm_pool_size="1GB", dashboard_address=":0")
    with pytest.raises(DfreError, match="dask cuda worker --rmm-pool-size"):
        cluster.connect("tcp://127.0.0.1:1", rmm_pool_size="1GB")
    code = main(
        ["cluster", "info", "--no-gpu", "--rmm-pool-size", "1GB", "--dashboard-address", ":0"]
    )
    assert code == 2
    assert "--rmm-pool-size needs GPU workers" in one_line_error(capsys)


@pytest.mark.parametrize("size", ["abc", "0", -2])
def test_rmm_pool_size_must_be_a_size(size):
    with pytest.raises(DfreError, match="is not a size: give bytes such as 20GB"):
        cluster.rmm_options(size)


def test_performance_report_in_missing_folder(tmp_path, capsys):
    report = tmp_path / "missing" / "report.html"
    assert main(["cluster", "info", "--performance-report", str(report)]) == 2
    assert "does not exist" in one_line_error(capsys)


# ---------------------------------------------------------------------- jobqueue config
def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("jobqueue:\n  slurm:\n    cores: 4\n", "lacks required keys memory"),
        ("jobqueue:\n  slurm:\n    walltime: '01:00:00'\n", "lacks required keys cores, memory"),
        ("jobqueue:\n  pbs:\n    cores: 4\n    memory: 8GB\n", "no 'jobqueue: slurm:' section"),
        ("jobqueue:\n  slurm:\n    cores: 4\n    memory: 8GB\n    cpus: 3\n", "unknown .* cpus"),
        ("jobqueue:\n  slurm:\n    cores: four\n    memory: 8GB\n", "cores must be a positive"),
        ("jobqueue:\n  slurm:\n    cores: 4\n    memory: lots\n", "is not a size"),
        ("jobqueue: [\n", "not valid YAML near line"),
    ],
)
def test_bad_jobqueue_config(tmp_path, capsys, text, message):
    config = write_yaml(tmp_path / "jq.yaml", text)
    with pytest.raises(DfreError, match=message):
        cluster.load_jobqueue_config("slurm", config)
    code = main(
        ["cluster", "start", "--jobqueue", "slurm", "--config", str(config),
         "--scheduler-file", str(tmp_path / "s.json")]
    )  # fmt: skip
    assert code == 2
    assert str(config) in one_line_error(capsys)
    assert not (tmp_path / "s.json").exists()


def test_missing_jobqueue_config_file(tmp_path):
    with pytest.raises(DfreError, match="does not exist"):
        cluster.load_jobqueue_config("pbs", tmp_path / "absent.yaml")


def test_jobqueue_defaults_from_dask_config_need_job_size():
    with pytest.raises(DfreError, match="the Dask config: jobqueue.pbs lacks required keys"):
        cluster.load_jobqueue_config("pbs")


def test_cluster_start_argument_errors(tmp_path, capsys):
    config = write_yaml(
        tmp_path / "jq.yaml", "jobqueue:\n  slurm:\n    cores: 1\n    memory: 1GB\n"
    )
    base = ["cluster", "start", "--jobqueue", "slurm", "--config", str(config)]
    assert main(base) == 2
    assert "needs --scheduler-file" in one_line_error(capsys)
    assert main([*base, "--scheduler-file", "s.json", "--adapt", "5:2"]) == 2
    assert "MIN <= MAX" in one_line_error(capsys)


def test_analysis_config_cluster_section(tmp_path):
    config = write_yaml(
        tmp_path / "study.yaml",
        "store: data.zarr\ncluster:\n  jobqueue:\n    slurm:\n      cores: 8\n"
        "      memory: 32GB\n      job_extra_directives: ['--gres=gpu:2']\n",
    )
    settings = cluster.load_jobqueue_config("slurm", config)
    assert settings["cores"] == 8 and settings["memory"] == "32GB"
    assert settings["job-extra-directives"] == ["--gres=gpu:2"]
    assert settings["walltime"] == "00:30:00"  # dask-jobqueue's default kept


# ---------------------------------------------------------------------- PBS (no PBS here)
def test_pbs_job_script_for_gpu_workers(tmp_path, capsys):
    """The PBS code path up to submission: the job script dask-jobqueue would qsub."""
    config = write_yaml(
        tmp_path / "pbs.yaml",
        "jobqueue:\n  pbs:\n    cores: 16\n    memory: 64GB\n    queue: gpu\n"
        "    walltime: '02:00:00'\n    resource-spec: select=1:ncpus=16:ngpus=4:mem=64GB\n"
        "    python: /opt/dfre/bin/python\n",
    )
    code = main(
        ["cluster", "start", "--jobqueue", "pbs", "--config", str(config), "--gpu", "--dry-run"]
    )  # fmt: skip
    script = capsys.readouterr().out
    assert code == 0
    assert "#PBS -q gpu" in script
    assert "#PBS -l select=1:ncpus=16:ngpus=4:mem=64GB" in script
    assert "#PBS -l walltime=02:00:00" in script
    assert "/opt/dfre/bin/python -m dask_cuda.cli tcp://SCHEDULER:8786" in script
    assert "--nthreads 16" in script


def test_slurm_job_script_for_cpu_workers(tmp_path, capsys):
    config = write_yaml(
        tmp_path / "slurm.yaml",
        "jobqueue:\n  slurm:\n    cores: 8\n    memory: 32GB\n    processes: 2\n"
        "    account: chem\n",
    )
    assert main(["cluster", "start", "--jobqueue", "slurm", "--config", str(config),
                 "--dry-run"]) == 0  # fmt: skip
    script = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH -A chem" in script
    assert "-m distributed.cli.dask_worker tcp://SCHEDULER:8786" in script
    assert "--nworkers 2" in script and "--nthreads 4" in script


def test_gpu_jobs_refuse_several_processes(tmp_path):
    config = write_yaml(
        tmp_path / "jq.yaml",
        "jobqueue:\n  slurm:\n    cores: 8\n    memory: 32GB\n    processes: 4\n"
        "    python: /opt/dfre/bin/python\n",
    )
    with pytest.raises(DfreError, match="set processes: 1"):
        cluster.jobqueue_job_script("slurm", config, gpu=True)


def test_gpu_jobs_need_dask_cuda_here(tmp_path):
    config = write_yaml(
        tmp_path / "jq.yaml", "jobqueue:\n  slurm:\n    cores: 8\n    memory: 8GB\n"
    )
    with pytest.raises(DfreError, match="dask-cuda is not installed"):
        cluster.jobqueue_job_script("slurm", config, gpu=True)


def test_pbs_start_without_qsub(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without qsub
    config = write_yaml(tmp_path / "jq.yaml", "jobqueue:\n  pbs:\n    cores: 2\n    memory: 2GB\n")
    with pytest.raises(DfreError, match="qsub not found: run .* on a PBS login node"):
        cluster.jobqueue_cluster("pbs", config, scheduler_file=tmp_path / "s.json")


def test_toml_analysis_config_and_bad_toml(tmp_path):
    study = write_yaml(
        tmp_path / "study.toml",
        '[cluster.jobqueue.pbs]\ncores = 4\nmemory = "8GB"\nqueue = "gpu"\n',
    )
    settings = cluster.load_jobqueue_config("pbs", study)
    assert (settings["cores"], settings["memory"], settings["queue"]) == (4, "8GB", "gpu")
    bad = write_yaml(tmp_path / "bad.toml", "[cluster.jobqueue.pbs\n")
    with pytest.raises(DfreError, match="is not valid TOML"):
        cluster.load_jobqueue_config("pbs", bad)


DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "jobqueue"


@pytest.mark.parametrize("name", ["slurm", "slurm-gpu", "pbs", "pbs-gpu"])
def test_deploy_jobqueue_examples_are_valid(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dask-jobqueue creates the log directory
    kind = name.split("-")[0]
    config = DEPLOY / f"{name}.yaml"
    assert cluster.load_jobqueue_config(kind, config)["cores"] == 32
    assert main(["cluster", "start", "--jobqueue", kind, "--config", str(config), "--dry-run"]) == 0
    script = capsys.readouterr().out
    if name.endswith("gpu"):
        assert "-m dask_cuda.cli tcp://SCHEDULER:8786" in script
        assert "--gres=gpu:4" in script or "ngpus=4" in script
    else:
        assert "-m distributed.cli.dask_worker tcp://SCHEDULER:8786" in script
        assert "--nworkers 4 --nanny" in script and "--nthreads 8" in script


def test_cli_info_waits_for_workers(dask_cluster, capsys):
    assert main(["cluster", "info", "--scheduler", dask_cluster[0], "--wait", "2"]) == 0
    assert "workers 2" in capsys.readouterr().out
    code = main(
        ["cluster", "info", "--scheduler", dask_cluster[0], "--wait", "3", "--wait-timeout", "1"]
    )  # fmt: skip
    assert code == 2
    assert "only 2 of 3 workers joined" in one_line_error(capsys)


def test_tls_settings_of_the_dask_config_pass_through(tmp_path):
    """A TLS scheduler is reached with Dask's own TLS settings, untouched by dfre."""
    from distributed.security import Security

    certs = Security.temporary()  # a throw-away CA and certificate
    files = {}
    for name, pem in [
        ("ca", certs.tls_ca_file), ("cert", certs.tls_scheduler_cert),
        ("key", certs.tls_scheduler_key),
    ]:  # fmt: skip
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(pem)
    tls = ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]),
           "--tls-key", str(files["key"])]  # fmt: skip
    scheduler_file = tmp_path / "scheduler.json"
    with open(tmp_path / "log.txt", "w") as log:
        procs = [start_scheduler(scheduler_file, log, "--protocol", "tls", *tls)]
        try:
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "dask"),
                        "worker",
                        "--scheduler-file",
                        str(scheduler_file),
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        *tls,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
            address = json.loads(scheduler_file.read_text())["address"]
            assert address.startswith("tls://")
            with pytest.raises(DfreError, match="uses TLS but the Dask config has no TLS"):
                cluster.connect(address, timeout=5)
            settings = {
                "distributed.comm.tls.ca-file": str(files["ca"]),
                "distributed.comm.tls.client.cert": str(files["cert"]),
                "distributed.comm.tls.client.key": str(files["key"]),
            }
            with dask.config.set(settings), cluster.connected(address, quiet=True) as client:
                client.wait_for_workers(1, timeout=60)
                assert client.submit(operator.add, 1, 2).result(timeout=30) == 3
        finally:
            for proc in reversed(procs):
                stop(proc)


# ---------------------------------------------------------------------- no workers, interfaces
def test_command_waits_for_workers_then_fails_in_one_line(tmp_path):
    """An external scheduler without workers: "waiting for workers", then after the
    timeout (option, or environment variable) a one-line error, the lock released and
    the store unchanged."""
    from dfre.lock import LOCK_NAME

    store = make_store(tmp_path / "store.zarr", n_structures=50)
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "scheduler.log", "w")
    scheduler = start_scheduler(scheduler_file, log)
    try:
        before = sorted(p.name for p in Path(store.path).rglob("*"))
        args = ["gfre", "--store", store.path, "--features", *FEATURES, "--selection",
                "random:20", "--scheduler-file", str(scheduler_file)]  # fmt: skip
        for extra, env in [(["--worker-timeout", "2"], {}), ([], {"DFRE_WORKER_TIMEOUT": "1.5"})]:
            done = subprocess.run(
                [sys.executable, "-m", "dfre", *args, *extra],
                capture_output=True, text=True, timeout=120, env={**os.environ, **env},
            )  # fmt: skip
            seconds = "2" if extra else "1.5"
            where = f"{json.loads(scheduler_file.read_text())['address']} (from scheduler file "
            where += f"{scheduler_file})"
            assert done.returncode == 2, done.stderr
            assert done.stderr.splitlines()[-2:] == [
                f"dfre: waiting for workers to join the scheduler at {where} (up to {seconds} s; "
                "--worker-timeout or DFRE_WORKER_TIMEOUT sets the wait)",
                f"dfre: error: no Dask worker joined the scheduler at {where} within {seconds} s: "
                "start workers (`dfre cluster start`, `dask worker`), check the worker jobs' "
                "logs, or wait longer with --worker-timeout",
            ]
            assert not (Path(store.path) / LOCK_NAME).exists()
        assert sorted(p.name for p in Path(store.path).rglob("*")) == before

        # a worker that joins during the wait: the command runs on it
        command = subprocess.Popen(
            [sys.executable, "-m", "dfre", *args, "--worker-timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert "waiting for workers" in command.stderr.readline()
        worker = subprocess.Popen(
            [str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file), "--host",
             "127.0.0.1", "--nthreads", "1", "--no-dashboard"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, err = command.communicate(timeout=120)
            assert command.returncode == 0, err
            assert "GFRE" in out
        finally:
            stop(worker)
    finally:
        stop(scheduler)
        log.close()


def test_scheduler_interface_must_exist_here(tmp_path, capsys):
    import psutil

    config = write_yaml(
        tmp_path / "jq.yaml",
        "jobqueue:\n  slurm:\n    cores: 1\n    memory: 1GB\n    interface: nosuch0\n",
    )
    code = main(["cluster", "start", "--jobqueue", "slurm", "--config", str(config),
                 "--workers", "1", "--scheduler-file", str(tmp_path / "s.json")])  # fmt: skip
    assert code == 2
    assert one_line_error(capsys) == (
        f"dfre: error: jobqueue config {config}: jobqueue.slurm.interface is 'nosuch0', but this "
        "machine, where the scheduler runs, has no such network interface (it has "
        f"{', '.join(sorted(psutil.net_if_addrs()))}): remove the key to use this host's "
        "address, or set scheduler-options: {interface: NAME} to one of these for the "
        "scheduler alone"
    )
    assert not (tmp_path / "s.json").exists()
    # the workers may use an interface the login node lacks, with the scheduler's own
    settings = cluster.load_jobqueue_config("slurm", config)
    settings["scheduler-options"] = {"interface": "lo"}
    cluster._check_scheduler_interface(settings, "x", "slurm")


@pytest.mark.parametrize("name", ["slurm", "slurm-gpu", "pbs", "pbs-gpu"])
def test_deploy_jobqueue_examples_need_no_ib0(name):
    settings = cluster.load_jobqueue_config(name.split("-")[0], DEPLOY / f"{name}.yaml")
    cluster._check_scheduler_interface(settings, name, name.split("-")[0])
    assert not settings.get("interface")
