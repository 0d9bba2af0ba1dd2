"""``dfre cluster``: start a Dask cluster on SLURM/PBS, or describe the one dfre would use.

``dfre cluster start --jobqueue slurm --config deploy/jobqueue/slurm.yaml --workers 8
--scheduler-file sched.json`` starts a scheduler here, submits worker jobs, writes the
scheduler file and stays in the foreground until interrupted (Ctrl-C or SIGTERM), then
cancels the jobs and removes the file. Other dfre commands run on it with
``--scheduler-file sched.json``. It keeps its jobs: a job that the batch system no
longer runs (cancelled, failed, out of wall time) is logged and replaced; after
``--max-job-failures`` jobs in a row that ended before their workers joined it stops
with a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from dfre.cli.options import add_cluster_arguments
from dfre.errors import DfreError

#: Batch systems ``dfre cluster start --jobqueue`` knows (as dfre.cluster.JOBQUEUE_KINDS).
JOBQUEUE_KINDS = ("slurm", "pbs")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="start Dask workers as SLURM/PBS jobs, or show the cluster dfre would use",
        description=__doc__.split("\n\n")[0],
    )
    actions = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    start = actions.add_parser(
        "start",
        help="start a scheduler here and Dask workers as batch jobs (dask-jobqueue)",
        description="Start a Dask scheduler here whose workers are SLURM or PBS jobs, write "
        "its scheduler file, and stay in the foreground until interrupted.",
    )
    start.add_argument("--jobqueue", required=True, choices=JOBQUEUE_KINDS, help="the batch system")
    start.add_argument(
        "--config",
        metavar="FILE",
        help="YAML with a 'jobqueue: {slurm|pbs: ...}' section, or an analysis config "
        "(YAML/TOML) with it under 'cluster' (default: the Dask config)",
    )
    size = start.add_mutually_exclusive_group()
    size.add_argument("--workers", type=int, metavar="N", help="keep N workers (default 1)")
    size.add_argument(
        "--adapt", metavar="MIN:MAX", help="adapt between MIN and MAX workers to the load"
    )
    start.add_argument(
        "--gpu", action="store_true", help="GPU workers through dask-cuda's worker command"
    )
    start.add_argument(
        "--scheduler-file", metavar="FILE", help="write the scheduler's address to FILE"
    )
    start.add_argument(
        "--dashboard-address", metavar="ADDR", help="dashboard address (default :8787)"
    )
    start.add_argument(
        "--check-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often the worker jobs are checked and lost ones replaced (default 10)",
    )
    start.add_argument(
        "--max-job-failures",
        type=int,
        default=3,
        metavar="N",
        help="stop after N worker jobs in a row ended before their workers joined (default 3)",
    )
    start.add_argument(
        "--dry-run",
        action="store_true",
        help="print the job script one worker job would run; start and submit nothing",
    )
    start.set_defaults(handler=run_start)

    info = actions.add_parser(
        "info",
        help="connect as other commands do and list the scheduler and its workers",
    )
    info.add_argument(
        "--wait",
        type=int,
        metavar="N",
        help="first wait until N workers have joined (e.g. in a batch script)",
    )
    info.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up waiting for the workers after this long (default 600)",
    )
    add_cluster_arguments(info)
    info.set_defaults(handler=run_info)


def _parse_adapt(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise DfreError(f"--adapt {text!r} must look like MIN:MAX, e.g. 0:16") from None
    if not 0 <= low <= high or high < 1:
        raise DfreError(f"--adapt {text!r} needs 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def run_start(args: argparse.Namespace) -> int:
    from distributed import Client

    from dfre import cluster

    if args.dry_run:
        print(cluster.jobqueue_job_script(args.jobqueue, args.config, gpu=args.gpu), end="")
        return 0
    if not args.scheduler_file:
        raise DfreError(
            "dfre cluster start needs --scheduler-file FILE: other dfre commands connect "
            "to the cluster through that file"
        )
    if args.workers is not None and args.workers < 1:
        raise DfreError(f"--workers must be at least 1, got {args.workers}")
    adapt = _parse_adapt(args.adapt) if args.adapt else None

    jobs = cluster.jobqueue_cluster(
        args.jobqueue,
        args.config,
        gpu=args.gpu,
        scheduler_file=args.scheduler_file,
        dashboard_address=args.dashboard_address,
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    keeper = None
    try:
        if adapt:
            jobs.adapt(minimum=adapt[0], maximum=adapt[1])
            with Client(jobs) as client:  # commands then do not wait for workers
                client.set_metadata(cluster.ADAPTIVE_KEY, list(adapt))
            sizing = f"adapting between {adapt[0]} and {adapt[1]} workers"
        else:
            n = args.workers or 1
            keeper = cluster.JobKeeper(
                jobs, args.jobqueue, n, max_failures=args.max_job_failures, say=_say
            )
            cluster.submit_workers(jobs, n)
            sizing = f"{n} worker jobs requested, lost ones are replaced"
        _say(f"scheduler {jobs.scheduler_address}, {sizing}")
        _say(f"dashboard {jobs.dashboard_link}")
        _say(f"scheduler file {args.scheduler_file}: connect with --scheduler-file")
        _say("running until interrupted (Ctrl-C or SIGTERM)")
        _follow(jobs, keeper, args.check_every)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _say("stopping: cancelling worker jobs")
        jobs.close()
        if os.path.exists(args.scheduler_file):
            os.remove(args.scheduler_file)
    _say("cluster stopped")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"dfre cluster: {message}", flush=True)


def _follow(jobs, keeper, check_every: float) -> None:
    """Report the number of connected workers whenever it changes; every ``check_every``
    seconds let ``keeper`` replace lost jobs (its DfreError stops the cluster)."""
    seen = None
    next_check = time.monotonic() + check_every
    while True:
        n = len(jobs.scheduler_info.get("workers", {}))
        if n != seen:
            _say(f"{n} workers connected")
            seen = n
        if keeper is not None and time.monotonic() >= next_check:
            keeper.check()
            next_check = time.monotonic() + check_every
        time.sleep(min(1.0, check_every))


def run_info(args: argparse.Namespace) -> int:
    from dfre import cluster

    with cluster.client_from_args(args, wait_for_workers=False) as client:
        if args.wait:
            try:
                client.wait_for_workers(args.wait, timeout=args.wait_timeout)
            except TimeoutError:
                joined = len(client.scheduler_info(n_workers=-1).get("workers", {}))
                raise DfreError(
                    f"only {joined} of {args.wait} workers joined the scheduler within "
                    f"{args.wait_timeout:g} s: check the worker jobs' logs"
                ) from None
        info = client.scheduler_info(n_workers=-1)
        workers = info.get("workers", {})
        print(f"scheduler {info.get('address', client.scheduler.address)}")
        print(f"dashboard {client.dashboard_link}")
        print(f"workers {len(workers)}")
        for address, w in sorted(workers.items()):
            memory = w.get("memory_limit") or 0
            print(
                f"  {w.get('name', address)}  {address}  threads={w.get('nthreads')}  "
                f"memory={memory / 2**30:.1f} GiB"
            )
    sys.stdout.flush()
    return 0
