"""Options shared by the sub-commands, declared the same way everywhere.

This module imports nothing heavy (no numpy, Dask, Zarr or torch): the parser of every
command is built from it, and ``dfre --help`` must start fast.

- ``--store PATH`` names the store in every command that reads or writes one
  (:func:`add_store_argument`; ``dfre info`` and ``dfre verify`` also take it as a
  positional argument: :func:`add_positional_store_argument`);
- ``--features A B ...`` lists feature sets (:func:`add_features_argument`; repeating
  the option adds more: ``--features A --features B``);
- the cluster options (:func:`add_cluster_arguments`) choose where a command computes.
"""

from __future__ import annotations

import argparse

#: Seconds to wait for a scheduler before giving up with an error.
DEFAULT_TIMEOUT = 10.0
#: Environment variable naming a running scheduler (read by Dask as ``scheduler-address``).
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
#: Dashboard address of a local cluster (another free port if it is taken).
DEFAULT_DASHBOARD = ":8787"
#: Seconds a computing command waits for a first worker of an external scheduler.
DEFAULT_WORKER_TIMEOUT = 300.0
#: Environment variable that sets that wait (``--worker-timeout`` wins over it).
WORKER_TIMEOUT_ENV = "DFRE_WORKER_TIMEOUT"


def add_store_argument(
    parser: argparse.ArgumentParser, help: str = "path or URL of the dfre store", **kwargs
) -> None:
    """``--store PATH`` (required unless ``kwargs`` say otherwise)."""
    kwargs.setdefault("required", True)
    parser.add_argument("--store", metavar="PATH", help=help, **kwargs)


def add_positional_store_argument(parser: argparse.ArgumentParser) -> None:
    """The store as ``STORE`` or ``--store PATH`` (either form; read by
    :func:`positional_store`)."""
    parser.add_argument(
        "store_path", nargs="?", metavar="STORE", help="the store, as --store (either form)"
    )
    add_store_argument(parser, required=False)


def positional_store(args: argparse.Namespace, missing: str) -> str:
    """The store given as ``STORE`` or ``--store``; a one-line error for two different
    stores, or for none (``missing`` says how to give it)."""
    from dfre.errors import DfreError

    if args.store and args.store_path and args.store != args.store_path:
        raise DfreError(f"two stores given ({args.store_path} and --store {args.store}): give one")
    path = args.store or args.store_path
    if not path:
        raise DfreError(missing)
    return path


def add_features_argument(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = True,
) -> None:
    """``--features A B ...`` (repeatable: the lists are joined)."""
    parser.add_argument(
        "--features",
        nargs="+",
        action="extend",
        required=required,
        metavar="MODEL/LAYER",
        help=help,
    )


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: recompute results whose inputs and settings are unchanged."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute even when results/<run> was made from the same inputs and settings "
        "(by default such a result is reused)",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of :func:`dfre.cluster.client_from_args` to a sub-command's parser."""
    g = parser.add_argument_group("cluster (default: a local cluster sized to this machine)")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help=f"address of a running Dask scheduler (default: ${SCHEDULER_ENV} if set)",
    )
    g.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="scheduler file written by `dask scheduler --scheduler-file` or `dfre cluster start`",
    )
    g.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require GPU workers (--no-gpu: a CPU local cluster; default: GPUs when present)",
    )
    g.add_argument(
        "--workers", type=int, metavar="N", help="workers of the local cluster (default: auto)"
    )
    g.add_argument(
        "--scheduler-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up reaching the scheduler after this long (default {DEFAULT_TIMEOUT:g})",
    )
    g.add_argument(
        "--worker-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"with a scheduler that has no workers, wait this long for one (default "
        f"${WORKER_TIMEOUT_ENV} or {DEFAULT_WORKER_TIMEOUT:g}; 0: do not wait)",
    )
    g.add_argument(
        "--dashboard-address",
        default=DEFAULT_DASHBOARD,
        metavar="ADDR",
        help=f"dashboard of the local cluster (default {DEFAULT_DASHBOARD}, or any free port "
        "if it is taken; ':0' for any free port)",
    )
    g.add_argument(
        "--rmm-pool-size",
        metavar="SIZE",
        help="RMM memory pool per GPU worker of the local dask-cuda cluster, used by CuPy "
        "(e.g. 20GB, or 0.8 of the GPU; needs the rmm package)",
    )
    g.add_argument(
        "--performance-report",
        metavar="FILE",
        help="write Dask's HTML performance report of the run to FILE",
    )
