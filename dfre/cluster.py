"""Where dfre computes: connect to a Dask cluster, start one, and report progress.

Every command and every library call computes with the active Dask scheduler. This
module decides which one, in this order:

1. ``scheduler`` (``--scheduler ADDRESS``): a running scheduler, e.g. ``tcp://node:8786``;
2. ``scheduler_file`` (``--scheduler-file FILE``): the JSON file a scheduler writes with
   ``dask scheduler --scheduler-file FILE`` (the HPC convention) or ``dfre cluster start``;
3. ``DASK_SCHEDULER_ADDRESS`` in the environment (Dask's ``scheduler-address`` setting);
4. otherwise a local cluster: ``dask_cuda.LocalCUDACluster`` (one worker per GPU) when
   dask-cuda and a CUDA GPU are present, else ``distributed.LocalCluster`` sized to the
   machine (Dask picks workers x threads from the CPU count, memory split evenly).

Dask's security settings (``distributed.comm.tls.*`` in the Dask config) are not
touched: clients and local clusters take them from the config as Dask does.

Long steps call :func:`compute` (or :func:`progress`) with a label: a progress bar on
stderr when it is a terminal, one summary line per step otherwise. The dashboard link
is printed when a client is made, and ``--performance-report FILE`` writes Dask's HTML
performance report of everything computed inside :func:`client_from_args`.

On HPC, :func:`jobqueue_cluster` starts a scheduler here and submits worker jobs to
SLURM or PBS through dask-jobqueue (GPU workers through dask-cuda's worker command).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client, LocalCluster, performance_report
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.security import Security

from dfre import progress as _progress
from dfre.cli.options import (  # noqa: F401 (add_cluster_arguments: part of this API)
    DEFAULT_DASHBOARD,
    DEFAULT_TIMEOUT,
    DEFAULT_WORKER_TIMEOUT,
    SCHEDULER_ENV,
    WORKER_TIMEOUT_ENV,
    add_cluster_arguments,
)
from dfre.errors import DfreError
from dfre.linalg import backend

#: Scheduler metadata key where ``dfre cluster start --adapt`` records MIN:MAX.
ADAPTIVE_KEY = "dfre-adaptive"
#: Dask config of the environment variables worker processes start with.
PRE_SPAWN = "distributed.nanny.pre-spawn-environ"
DASK_TRIM_THRESHOLD = "65536"
#: glibc malloc settings of local worker processes: the large tensors of a forward pass
#: (neighbour graphs, features) are reused from the heap instead of being mapped and
#: unmapped by the kernel each time (measured: a third less time featurizing SevenNet-0,
#: half for CHGNet, on CPU); up to 256 MiB of freed memory stays with each worker.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
#: Batch systems ``dfre cluster start --jobqueue`` knows.
JOBQUEUE_KINDS = ("slurm", "pbs")
#: Keys a jobqueue section must set: the size of one job.
REQUIRED_JOBQUEUE_KEYS = ("cores", "memory")
#: dask-cuda's worker command as dask-jobqueue runs it (``python -m dask_cuda.cli ...``).
DASK_CUDA_WORKER_COMMAND = "dask_cuda.cli"
_DEFAULT_WORKER_COMMAND = "distributed.cli.dask_worker"


# ---------------------------------------------------------------------------- GPUs
def gpu_count() -> int:
    """Number of CUDA GPUs a local dask-cuda cluster would use here (0 without CuPy or dask-cuda).

    Counts like dask-cuda: the entries of ``CUDA_VISIBLE_DEVICES`` if set, else NVML.
    """
    if not backend.gpu_available() or importlib.util.find_spec("dask_cuda") is None:
        return 0
    try:
        from dask_cuda.utils import get_n_gpus

        return int(get_n_gpus())
    except Exception:  # NVML missing or failing: no usable GPU
        return 0


def _require_local_gpu() -> None:
    if importlib.util.find_spec("dask_cuda") is None:
        raise DfreError(
            "--gpu needs dask-cuda, which is not installed: pip install 'dfre[gpu]', "
            "or run without --gpu"
        )
    if gpu_count() == 0:
        raise DfreError(
            "--gpu was given but this machine has no usable CUDA GPU (CuPy/NVML see none): "
            "run on a GPU node or without --gpu"
        )


def _worker_has_gpu() -> bool:
    from dfre.linalg import backend as worker_backend

    return worker_backend.gpu_available()


def _require_gpu_workers(client: Client, where: str) -> None:
    has_gpu = client.run(_worker_has_gpu)
    if not any(has_gpu.values()):
        raise DfreError(
            f"--gpu was given but none of the {len(has_gpu)} workers of the scheduler at "
            f"{where} has a usable CUDA GPU: start GPU workers (dask-cuda) or drop --gpu"
        )


# ---------------------------------------------------------------------------- connecting
def read_scheduler_file(path: str | os.PathLike) -> str:
    """The scheduler address written in scheduler file ``path``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DfreError(
            f"scheduler file {path} does not exist: start the scheduler first "
            f"(`dask scheduler --scheduler-file {path}` or `dfre cluster start ... "
            f"--scheduler-file {path}`) or fix the path"
        )
    try:
        with open(path) as f:
            address = json.load(f)["address"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DfreError(
            f"scheduler file {path} is not a Dask scheduler file (JSON with an 'address'): "
            "point --scheduler-file at the file the scheduler wrote"
        ) from None
    return str(address)


def connect(
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
    *,
    gpu: bool | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    dashboard_address: str | None = ":8787",
    quiet: bool = False,
    worker_timeout: float | None = 0.0,
    rmm_pool_size: str | None = None,
) -> Client:
    """A :class:`distributed.Client` (made the default) for the cluster dfre should use.

    See the module docstring for the order in which ``scheduler``, ``scheduler_file``,
    ``DASK_SCHEDULER_ADDRESS`` and a local cluster are tried. ``gpu=True`` requires GPU
    workers (locally: dask-cuda and a GPU), ``gpu=False`` forces a CPU local cluster,
    ``gpu=None`` uses GPUs when present. ``n_workers`` and ``threads_per_worker`` size a
    local cluster only. ``timeout`` (seconds) bounds the wait for a scheduler.
    ``worker_timeout`` (seconds; None: ``$DFRE_WORKER_TIMEOUT`` or
    :data:`DEFAULT_WORKER_TIMEOUT`; 0: no wait) bounds the wait for a first worker of
    a scheduler that has none: "waiting for workers" is printed, and a DfreError
    raised when none joined in time (an adaptive ``dfre cluster start --adapt``
    cluster starts workers on demand and is not waited for).
    ``rmm_pool_size`` (e.g. ``"20GB"`` or ``0.8`` of the GPU) gives every worker of a
    local dask-cuda cluster an RMM memory pool of that size, used by CuPy (see
    :func:`rmm_options`); workers of a running cluster get theirs where they start
    (``dask cuda worker --rmm-pool-size``).
    Close with :func:`disconnect`, which also stops a local cluster made here.
    """
    if scheduler and scheduler_file:
        raise DfreError("give either --scheduler or --scheduler-file, not both")
    if n_workers is not None and n_workers < 1:
        raise DfreError(f"--workers must be at least 1, got {n_workers}")
    if scheduler_file:
        address = read_scheduler_file(scheduler_file)
        where = f"{address} (from scheduler file {os.fspath(scheduler_file)})"
        hint = "the file is stale (its scheduler has stopped) or the scheduler is unreachable "
        hint += "from here: start the scheduler again or remove the file"
    elif scheduler:
        address, where = scheduler, f"{scheduler} (--scheduler)"
        hint = "check the address and that the scheduler is running"
    else:
        from_env = os.environ.get(SCHEDULER_ENV)
        address = from_env or dask.config.get("scheduler-address", None)
        source = SCHEDULER_ENV if from_env else "the Dask config's scheduler-address"
        where = f"{address} (from {source})"
        hint = f"start that scheduler or unset {source} to use a local cluster"

    if address and rmm_pool_size is not None:
        raise DfreError(
            f"--rmm-pool-size configures the workers of a local GPU cluster, but dfre connects "
            f"to the scheduler at {where}: start its workers with `dask cuda worker "
            "--rmm-pool-size SIZE` instead"
        )
    if address:
        _require_tls_settings(str(address), where)
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError):
            raise DfreError(
                f"cannot reach the Dask scheduler at {where} within {timeout:g} s: {hint}"
            ) from None
        try:
            _wait_for_workers(client, where, worker_timeout)
            if gpu:
                _require_gpu_workers(client, where)
        except (DfreError, KeyboardInterrupt):
            client.close()
            raise
    else:
        client = Client(
            _local_cluster(gpu, n_workers, threads_per_worker, dashboard_address, rmm_pool_size),
            timeout=timeout,
        )
        client.register_plugin(QuietTaskErrors())
    if not quiet:
        _progress.say(f"Dask dashboard {client.dashboard_link}")
    return client


class _DropTaskErrorLogs(logging.Filter):
    """Drops a worker's log of a failed task: the task's exception (with its remote
    traceback) reaches the client, which reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Compute Failed") or "ended with CancelledError" in message)


class QuietTaskErrors(WorkerPlugin):
    """On the workers of a local cluster, whose logs share the command's terminal: no
    multi-line log of a failed task (the command reports it in one line, or with its
    traceback when it is a bug)."""

    name = "dfre-quiet-task-errors"

    def setup(self, worker) -> None:
        for name in ("distributed.worker", "distributed.worker.state_machine"):
            logging.getLogger(name).addFilter(_DropTaskErrorLogs())


def worker_timeout_setting(value: float | None = None) -> float:
    """The wait for workers: ``value``, else ``$DFRE_WORKER_TIMEOUT``, else the default."""
    if value is not None:
        return float(value)
    text = os.environ.get(WORKER_TIMEOUT_ENV)
    if text is None or not text.strip():
        return DEFAULT_WORKER_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise DfreError(f"{WORKER_TIMEOUT_ENV}={text!r} must be a number of seconds >= 0")
    return seconds


def _wait_for_workers(client: Client, where: str, worker_timeout: float | None) -> None:
    timeout = worker_timeout_setting(worker_timeout)
    if timeout == 0 or client.scheduler_info(n_workers=1).get("workers"):
        return
    if client.get_metadata(ADAPTIVE_KEY, None) is not None:
        return  # workers start when tasks arrive
    print(
        f"dfre: waiting for workers to join the scheduler at {where} (up to {timeout:g} s; "
        f"--worker-timeout or {WORKER_TIMEOUT_ENV} sets the wait)",
        file=sys.stderr,
        flush=True,
    )
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise DfreError(
            f"no Dask worker joined the scheduler at {where} within {timeout:g} s: start "
            "workers (`dfre cluster start`, `dask worker`), check the worker jobs' logs, or "
            "wait longer with --worker-timeout"
        ) from None


def _require_tls_settings(address: str, where: str) -> None:
    """A ``tls://`` scheduler needs Dask's TLS settings, which dfre passes through as is."""
    if not address.startswith("tls://"):
        return
    if Security().get_connection_args("client").get("ssl_context") is None:
        raise DfreError(
            f"the scheduler at {where} uses TLS but the Dask config has no TLS settings: set "
            "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and .client.key "
            "(e.g. in ~/.config/dask/distributed.yaml)"
        )


def _local_cluster(
    gpu: bool | None,
    n_workers: int | None,
    threads_per_worker: int | None,
    dashboard_address: str | None,
    rmm_pool_size: str | None = None,
) -> LocalCluster:
    if gpu:
        _require_local_gpu()
    if dashboard_address == DEFAULT_DASHBOARD and not _port_free(int(DEFAULT_DASHBOARD[1:])):
        dashboard_address = ":0"  # another free port, without Dask's warning about it
    with dask.config.set({PRE_SPAWN: worker_environment()}):
        if gpu or (gpu is None and gpu_count() > 0):
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker or 1,
                dashboard_address=dashboard_address,
                **rmm_options(rmm_pool_size),
            )
        if rmm_pool_size is not None:
            reason = "--no-gpu was given" if gpu is False else "this machine has no usable CUDA GPU"
            raise DfreError(
                f"--rmm-pool-size needs GPU workers, but {reason}: drop --rmm-pool-size or run "
                "on a GPU node"
            )
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            dashboard_address=dashboard_address,
        )


def worker_environment() -> dict:
    """The environment local worker processes start with: Dask's, with glibc's malloc set
    to keep large blocks in the heap (:data:`WORKER_MALLOC`) unless the Dask config
    already changed Dask's own malloc setting."""
    environment = dict(dask.config.get(PRE_SPAWN, None) or {})
    if str(environment.get("MALLOC_TRIM_THRESHOLD_", DASK_TRIM_THRESHOLD)) == DASK_TRIM_THRESHOLD:
        environment.update(WORKER_MALLOC)
    return environment


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of every interface here now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def rmm_options(pool_size: str | float | None) -> dict:
    """LocalCUDACluster keywords for an RMM pool of ``pool_size`` per worker ({} for None).

    The pool is RMM's (``rmm_pool_size``) and CuPy allocates from it
    (``rmm_allocator_external_lib_list=["cupy"]``): one pool reserved up front instead of
    CuPy's own pool growing and fragmenting next to torch's. ``pool_size`` is a size such
    as ``"20GB"`` or a fraction of the GPU's memory such as ``0.8``.
    """
    if pool_size is None:
        return {}
    from dask.utils import parse_bytes

    try:  # a number: a fraction of the GPU up to 1, else bytes
        size = float(pool_size)
        size = size if size <= 1 else int(size)
    except (TypeError, ValueError):
        size = pool_size
    try:
        valid = (size if isinstance(size, float | int) else parse_bytes(size)) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DfreError(
            f"--rmm-pool-size {pool_size!r} is not a size: give bytes such as 20GB or a "
            "fraction of the GPU memory such as 0.8"
        )
    if importlib.util.find_spec("rmm") is None:
        raise DfreError(
            "--rmm-pool-size needs RMM, which is not installed: pip install rmm-cu12 (or "
            "rmm-cu13, matching CuPy), or drop --rmm-pool-size"
        )
    return {
        "rmm_pool_size": size,
        "rmm_allocator_external_lib_list": ["cupy"],
    }


def disconnect(client: Client) -> None:
    """Close ``client`` and, if :func:`connect` started a local cluster for it, that cluster.

    A local cluster's workers are stopped by their nannies; one still busy (a model
    loading, a task cut short by an error) is killed after Dask's timeout, which Dask
    reports as a warning: that is the expected end of a local cluster, so it is not shown.
    """
    cluster = client.cluster
    client.close()
    if cluster is not None:
        with _quiet_loggers("distributed.nanny", "distributed.worker", "distributed.core"):
            cluster.close()


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors of the loggers ``names`` while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def connected(*args: Any, **kwargs: Any) -> Iterator[Client]:
    """``with connected(...) as client:`` -- :func:`connect`, then :func:`disconnect`."""
    client = connect(*args, **kwargs)
    try:
        yield client
    finally:
        disconnect(client)


# ---------------------------------------------------------------------------- command line
@contextlib.contextmanager
def client_from_args(
    args: argparse.Namespace, *, wait_for_workers: bool = True
) -> Iterator[Client]:
    """The client for a command run with the options of :func:`add_cluster_arguments`.

    Prints the dashboard link, waits for a first worker of an external scheduler that
    has none (``--worker-timeout``; not with ``wait_for_workers=False``), records a
    performance report if asked, and closes the client (and a local cluster it
    started) at the end.
    """
    report = getattr(args, "performance_report", None)
    if report:
        folder = os.path.dirname(os.path.abspath(report))
        if not os.path.isdir(folder):
            raise DfreError(
                f"--performance-report {report}: folder {folder} does not exist; create it first"
            )
    with connected(
        getattr(args, "scheduler", None),
        getattr(args, "scheduler_file", None),
        gpu=getattr(args, "gpu", None),
        n_workers=getattr(args, "workers", None),
        timeout=getattr(args, "scheduler_timeout", DEFAULT_TIMEOUT),
        dashboard_address=getattr(args, "dashboard_address", ":8787"),
        worker_timeout=getattr(args, "worker_timeout", None) if wait_for_workers else 0.0,
        rmm_pool_size=getattr(args, "rmm_pool_size", None),
    ) as client:
        if report:
            with performance_report(filename=report):
                yield client
            _progress.say(f"performance report written to {report}")
        else:
            yield client


# ---------------------------------------------------------------------------- progress
def progress(obj: Any, label: str) -> Any:
    """Wait for ``obj`` while showing the progress of step ``label``; return it persisted.

    ``obj`` is a dask collection (persisted on the cluster) or futures; see
    :mod:`dfre.progress`.
    """
    return _progress.persist(obj, label)


def compute(*collections: Any, label: str, **kwargs: Any) -> tuple:
    """``dask.compute(*collections)`` as the step ``label`` (see :mod:`dfre.progress`).

    Uses the current :class:`distributed.Client` when there is one, else Dask's
    default local scheduler; ``kwargs`` go to the compute call.
    """
    return _progress.compute(*collections, label=label, **kwargs)


def shared(values: list) -> list:
    """``values`` as arguments of many tasks, without embedding them in a task graph.

    With a distributed client they are scattered to every worker once (each value
    becomes a future that tasks depend on; a copy on each worker, so that losing a
    worker loses no value: scattered data cannot be recomputed); Dask's local
    schedulers pass Python objects as they are. Large arrays (row labels, weights)
    given this way keep the graphs sent to the scheduler small.
    """
    client = _current_client()
    if client is None or not values or dask.base.get_scheduler() != client.get:
        return list(values)  # no client, or another scheduler active (e.g. "sync")
    return client.scatter(list(values), hash=False, broadcast=True)


def _current_client() -> Client | None:
    try:
        from distributed import default_client

        return default_client()
    except ValueError:
        return None


# ---------------------------------------------------------------------------- dask-jobqueue
def _cluster_class(kind: str):
    if kind not in JOBQUEUE_KINDS:
        raise DfreError(f"unknown --jobqueue {kind!r}: choose one of {', '.join(JOBQUEUE_KINDS)}")
    try:
        import dask_jobqueue
    except ImportError:
        raise DfreError("dask-jobqueue is not installed: pip install 'dfre[hpc]'") from None
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]


def _hyphenate(settings: dict) -> dict:
    return {str(k).replace("_", "-"): v for k, v in settings.items()}


def load_jobqueue_config(kind: str, path: str | os.PathLike | None = None) -> dict:
    """The dask-jobqueue settings of batch system ``kind`` ("slurm" or "pbs").

    ``path`` is a YAML file in dask-jobqueue's layout (``jobqueue: {slurm: {...}}``),
    or a dfre analysis config (YAML, or TOML if it ends in ``.toml``) holding that
    layout under ``cluster`` (``[cluster.jobqueue.slurm]``). Without ``path``
    the settings come from the Dask config (e.g. ``~/.config/dask/jobqueue.yaml``).
    Keys are dask-jobqueue's (``cores``, ``memory``, ``queue``, ``walltime``,
    ``job-extra-directives``, ...); ``cores`` and ``memory`` are required. Returns the
    full section: dask-jobqueue's defaults overlaid with the given keys.
    """
    _cluster_class(kind)
    defaults = dict(dask.config.get(f"jobqueue.{kind}"))
    source = f"jobqueue config {os.fspath(path)}" if path else "the Dask config"
    if path is None:
        given = _hyphenate(dask.config.get(f"jobqueue.{kind}"))
    else:
        given = _read_jobqueue_file(os.fspath(path), kind)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DfreError(
            f"{source}: unknown jobqueue.{kind} keys {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(defaults))}"
        )
    missing = [k for k in REQUIRED_JOBQUEUE_KEYS if given.get(k) in (None, "")]
    if missing:
        raise DfreError(
            f"{source}: jobqueue.{kind} lacks required keys {', '.join(missing)}: set the size "
            "of one job, e.g. cores: 16 and memory: 64GB"
        )
    _check_job_size(given, source, kind)
    return {**defaults, **given}


def _read_jobqueue_file(path: str, kind: str) -> dict:
    if not os.path.isfile(path):
        raise DfreError(f"jobqueue config {path} does not exist: fix the --config path")
    document = _read_toml(path) if path.endswith(".toml") else _read_yaml(path)
    if not isinstance(document, dict):
        raise DfreError(f"jobqueue config {path} must be a mapping with a 'jobqueue' key")
    if "jobqueue" not in document and isinstance(document.get("cluster"), dict):
        document = document["cluster"]
    jobqueue = document.get("jobqueue")
    section = jobqueue.get(kind) if isinstance(jobqueue, dict) else None
    if not isinstance(section, dict):
        raise DfreError(
            f"jobqueue config {path} has no 'jobqueue: {kind}:' section: add one "
            f"(see deploy/jobqueue/{kind}.yaml)"
        )
    return _hyphenate(section)


def _read_yaml(path: str) -> Any:
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" near line {line + 1}" if line is not None else ""
        raise DfreError(f"jobqueue config {path} is not valid YAML{where}: fix it") from None


def _read_toml(path: str) -> Any:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise DfreError(f"jobqueue config {path} is not valid TOML ({error}): fix it") from None


def _check_job_size(settings: dict, source: str, kind: str) -> None:
    from dask.utils import parse_bytes

    cores = settings["cores"]
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise DfreError(
            f"{source}: jobqueue.{kind}.cores must be a positive integer, got {cores!r}"
        )
    try:
        parse_bytes(settings["memory"])
    except (ValueError, TypeError):
        raise DfreError(
            f"{source}: jobqueue.{kind}.memory {settings['memory']!r} is not a size like 64GB"
        ) from None


def _gpu_settings(settings: dict, source: str, kind: str) -> dict:
    """Settings for GPU jobs: dask-cuda's worker command, one dask-cuda process per job."""
    settings = dict(settings)
    if settings.get("worker-command") in (None, _DEFAULT_WORKER_COMMAND):
        settings["worker-command"] = DASK_CUDA_WORKER_COMMAND
    if settings.get("processes") not in (None, 1):
        raise DfreError(
            f"{source}: jobqueue.{kind}.processes is {settings['processes']} but GPU jobs run "
            "one dask-cuda process that starts a worker per GPU of the job: set processes: 1"
        )
    settings["processes"] = 1
    python = settings.get("python") or sys.executable
    if python == sys.executable and importlib.util.find_spec("dask_cuda") is None:
        raise DfreError(
            "--gpu workers run dask-cuda's worker command, but dask-cuda is not installed in "
            f"{python}: pip install 'dfre[gpu]' (or set python: in the jobqueue config)"
        )
    return settings


def _check_scheduler_interface(settings: dict, source: str, kind: str) -> None:
    """The network interface the scheduler binds to must exist here, where it runs.

    dask-jobqueue uses ``interface`` for the workers and, unless ``scheduler-options``
    sets ``interface`` or ``host``, for the scheduler too; a login node without the
    compute nodes' ``ib0`` would otherwise fail with a traceback.
    """
    import psutil

    options = settings.get("scheduler-options") or {}
    if "host" in options:
        return
    interface = options.get("interface") or settings.get("interface")
    available = sorted(psutil.net_if_addrs())
    if interface and interface not in available:
        key = "scheduler-options.interface" if options.get("interface") else "interface"
        raise DfreError(
            f"{source}: jobqueue.{kind}.{key} is {interface!r}, but this machine, where the "
            f"scheduler runs, has no such network interface (it has {', '.join(available)}): "
            "remove the key to use this host's address, or set scheduler-options: "
            "{interface: NAME} to one of these for the scheduler alone"
        )


def _register_settings(kind: str, settings: dict) -> str:
    """Put ``settings`` in the Dask config under a dfre section; return its name."""
    name = f"dfre-{kind}"
    dask.config.set({f"jobqueue.{name}": settings})
    return name


def jobqueue_job_script(
    kind: str, config: str | os.PathLike | None = None, *, gpu: bool = False
) -> str:
    """The batch script one worker job would run (nothing is started or submitted)."""
    settings, source = load_jobqueue_config(kind, config), config or "the Dask config"
    if gpu:
        settings = _gpu_settings(settings, str(source), kind)
    job_class = _cluster_class(kind).job_cls
    name = _register_settings(kind, settings)
    return job_class("tcp://SCHEDULER:8786", name="dfre-worker", config_name=name).job_script()


def jobqueue_cluster(
    kind: str,
    config: str | os.PathLike | None = None,
    *,
    gpu: bool = False,
    scheduler_file: str | os.PathLike | None = None,
    dashboard_address: str | None = None,
):
    """Start a scheduler here whose workers are SLURM or PBS jobs (a dask-jobqueue cluster).

    Settings come from :func:`load_jobqueue_config`. ``gpu=True`` launches workers with
    dask-cuda's worker command (one worker per GPU the job gets: request GPUs with
    ``job-extra-directives`` such as ``--gres=gpu:4`` on SLURM, or ``resource-spec`` such
    as ``select=1:ncpus=16:ngpus=4`` on PBS). ``scheduler_file`` is written by the
    scheduler for other dfre commands (``--scheduler-file``). No workers are requested
    yet: call ``.scale(n)`` or ``.adapt(minimum=, maximum=)`` on the result.
    """
    cluster_class = _cluster_class(kind)
    settings = load_jobqueue_config(kind, config)
    source = f"jobqueue config {os.fspath(config)}" if config else "the Dask config"
    if gpu:
        settings = _gpu_settings(settings, source, kind)
    _check_scheduler_interface(settings, source, kind)
    submit = cluster_class.job_cls.submit_command.split()[0]
    if shutil.which(submit) is None:
        raise DfreError(
            f"{submit} not found: run `dfre cluster start --jobqueue {kind}` on a {kind.upper()} "
            "login node (or check PATH)"
        )
    scheduler_options = dict(settings.get("scheduler-options") or {})
    if scheduler_file:
        scheduler_options["scheduler_file"] = os.fspath(scheduler_file)
    if dashboard_address is not None:
        scheduler_options["dashboard_address"] = dashboard_address
    name = _register_settings(kind, settings)
    return cluster_class(config_name=name, scheduler_options=scheduler_options)


def submit_workers(jobs, n: int) -> None:
    """Scale dask-jobqueue cluster ``jobs`` to ``n`` workers and submit their jobs now.

    A job the batch system refuses (unknown partition, account, resource request) raises
    :class:`DfreError` with the batch system's own message instead of a background log.
    """
    refused = _SubmitErrors()
    logger = logging.getLogger("tornado.application")
    logger.addFilter(refused)
    try:
        jobs.scale(n)
        jobs.sync(jobs._correct_state)  # waits for the submission that scale() scheduled
        time.sleep(0.2)  # its outcome is logged by the event loop just after
    finally:
        logger.removeFilter(refused)
    unsubmitted = [k for k, w in jobs.workers.items() if getattr(w, "job_id", None) is None]
    for name in unsubmitted:  # their start failed and there is nothing to cancel
        jobs.workers.pop(name).status = Status.failed
        jobs.worker_spec.pop(name, None)
    if refused.errors or unsubmitted:
        submit = jobs.job_cls.submit_command.split()[0]
        text = refused.errors[0] if refused.errors else "no job id came back"
        lines = [line for line in text.split("stderr:")[-1].splitlines() if line.strip()]
        raise DfreError(
            f"{submit} refused the worker job ({'; '.join(lines)}): "
            "fix the jobqueue config (queue, account, resources)"
        )


def queued_job_ids(kind: str) -> set[str] | None:
    """Ids of this user's jobs that the batch system still queues or runs (None when
    it cannot tell: the query failed). SLURM: ``squeue``; PBS: ``qselect``."""
    user = getpass.getuser()
    if kind == "slurm":
        states = "PENDING,RUNNING,CONFIGURING,SUSPENDED,REQUEUED,RESIZING,REQUEUE_HOLD"
        command = ["squeue", "-h", "-u", user, "-o", "%i", "-t", states]
    else:
        command = ["qselect", "-u", user, "-s", "QRHTW"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return {line.strip().split(".")[0] for line in done.stdout.splitlines() if line.strip()}


class _WorkerArrivals(SchedulerPlugin):
    """The names of every worker that joined the scheduler (it runs in this process)."""

    name = "dfre-worker-arrivals"

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_worker(self, scheduler, worker: str) -> None:
        self.names.add(str(scheduler.workers[worker].name))


class JobKeeper:
    """Keeps ``n`` worker jobs of a dask-jobqueue cluster, one :meth:`check` at a time.

    A job is lost when the batch system no longer queues or runs it (cancelled, failed,
    out of wall time) or when its workers left the scheduler and dask-jobqueue dropped
    it; each lost job is logged and replaced by a new submission. Jobs that end before
    any of their workers joined are failures: after ``max_failures`` of them in a row
    (a job whose workers joined resets the count), :meth:`check` raises a DfreError
    (a broken job script or config would otherwise be resubmitted forever).
    """

    def __init__(self, jobs, kind: str, n: int, *, max_failures: int = 3, say=print):
        self.jobs, self.kind, self.n = jobs, kind, n
        self.max_failures, self.say = max_failures, say
        self.joined: set[str] = set()  # names of jobs whose workers joined at some point
        self.failures = 0
        self.replaced = 0
        self.arrivals = _WorkerArrivals()  # sees short-lived workers too
        jobs.scheduler.add_plugin(self.arrivals)

    def _note_joined(self) -> None:
        names = set(self.arrivals.names)
        for job in self.jobs.workers:
            if job not in self.joined and any(
                str(name) == job or str(name).startswith(f"{job}-") for name in names
            ):
                self.joined.add(job)
                self.failures = 0

    def lost_jobs(self) -> list[tuple[str, str | None]]:
        """(name, job id) of the jobs that are gone."""
        self._note_joined()
        alive = queued_job_ids(self.kind)
        lost = []
        if alive is not None:
            for name, job in self.jobs.workers.items():
                job_id = getattr(job, "job_id", None)
                if job_id and job_id not in alive:
                    lost.append((name, job_id))
        lost += [(name, None) for name in self.jobs.worker_spec if name not in self.jobs.workers]
        return lost

    def check(self) -> None:
        """Replace the lost jobs (see the class docstring)."""
        lost = self.lost_jobs()
        if not lost:
            return
        logs = "the batch system's job output files"
        for name, job_id in lost:
            joined = name in self.joined
            self.failures = 0 if joined else self.failures + 1
            when = "after its workers had joined" if joined else "before any of its workers joined"
            self.say(f"worker job {job_id or '?'} ({name}) ended {when}")
            logs = getattr(self.jobs.workers.pop(name, None), "log_directory", None) or logs
            self.jobs.worker_spec.pop(name, None)
            if self.failures >= self.max_failures:
                raise DfreError(
                    f"{self.failures} worker jobs in a row ended before their workers joined "
                    f"(last: job {job_id}): see their logs in {logs} and fix the jobqueue config "
                    "or the job environment; the cluster stops"
                )
        self.replaced += len(lost)
        self.say(f"submitting {len(lost)} replacement job(s) to keep {self.n} jobs")
        submit_workers(self.jobs, self.n)


class _SubmitErrors(logging.Filter):
    """Collects (and keeps off stderr) the event loop's report of a refused submission."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "_correct_state" in record.getMessage():
            self.errors.append(str(record.exc_info[1]))
            return False
        return True
