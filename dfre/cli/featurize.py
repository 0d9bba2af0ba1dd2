"""``dfre featurize``: per-atom latent features of a model for every structure of a store."""

from __future__ import annotations

import os

from dfre.cli.options import add_cluster_arguments, add_store_argument
from dfre.defaults import BATCH_ATOMS as DEFAULT_BATCH_ATOMS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "featurize",
        help="extract per-atom latent features of a model into the store",
        description="Run a model (see `dfre models`) on every structure of the store, in "
        "Dask tasks over chunks of atoms, and write features/<model>/<layer>. Resumable: "
        "a re-run computes only what is missing. Structures the model cannot handle are "
        "masked and reported.",
    )
    add_store_argument(p)
    p.add_argument("--model", required=True, help="registry name, e.g. chgnet-0.3.0")
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers, e.g. ll,bb (default: all the model offers)",
    )
    p.add_argument(
        "--batch-atoms",
        type=int,
        default=DEFAULT_BATCH_ATOMS,
        metavar="N",
        help=f"atoms per forward pass, whole structures (default {DEFAULT_BATCH_ATOMS})",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device of the models on the workers (default: cuda with --gpu, else cpu)",
    )
    p.add_argument(
        "--name", default=None, help="model name in the store (default: the --model name)"
    )
    p.add_argument(
        "--weights", default=None, metavar="PATH", help="model file, for user-file models"
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="open a --weights file that only loads by full unpickling (a pickled module, "
        "MACE .model, fairchem checkpoint): it can run any code it holds, so only for files "
        "from a source you trust (see README, Safe loading)",
    )
    p.add_argument(
        "--hook",
        action="append",
        default=None,
        metavar="LAYER=MODULE",
        help="generic model: a layer and the dotted path of the module whose input it "
        "is (repeatable), e.g. ll=mlp.layers.7",
    )
    p.add_argument(
        "--option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="extra option of the model loader (repeatable), e.g. head=omat",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="batches whose graphs are built ahead by threads (default: 2 on cuda, 0 on cpu)",
    )
    p.add_argument(
        "--graph-processes",
        type=int,
        default=None,
        metavar="N",
        help="processes per worker building graphs ahead of the forward pass "
        "(default: CPU cores - 2 on cuda, 0 on cpu; starts non-daemonic workers)",
    )
    p.add_argument(
        "--resources",
        action="append",
        default=None,
        metavar="NAME=N",
        help="Dask worker resources each task needs (repeatable), e.g. mace=1 to run on "
        "workers started in the model's own environment with `dask worker --resources mace=1` "
        "(without it, the tasks run on the workers whose environment has the model's package)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per worker (default: CPU cores / Dask workers)",
    )
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def model_options(args) -> dict:
    """Loader options from --weights, --hook and --option."""
    options: dict = {}
    if args.weights:
        options["path"] = os.path.abspath(args.weights)
    if getattr(args, "trust_checkpoint", False):
        options["trust_checkpoint"] = True
    if args.hook:
        options["hooks"] = dict(_key_value(h, "--hook") for h in args.hook)
    for item in args.option or []:
        key, value = _key_value(item, "--option")
        options[key] = value
    return options


def _key_value(item: str, flag: str) -> tuple[str, str]:
    from dfre.errors import DfreError

    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise DfreError(f"{flag} {item!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def _resource(item: str) -> tuple[str, float]:
    from dfre.errors import DfreError

    key, value = _key_value(item, "--resources")
    try:
        return key, float(value)
    except ValueError:
        raise DfreError(f"--resources {item!r}: the amount must be a number") from None


def run(args) -> int:
    import dask

    from dfre import progress
    from dfre.cluster import client_from_args
    from dfre.featurize import check_request, check_settings, featurize, featurize_is_complete
    from dfre.lock import store_lock
    from dfre.models.base import get_spec
    from dfre.store import Store

    layers = [layer.strip() for layer in args.layers.split(",")] if args.layers else None
    device = args.device or ("cuda" if args.gpu else "cpu")
    if device == "cuda" and args.gpu is None:
        args.gpu = True
    prefetch = args.prefetch if args.prefetch is not None else (2 if device == "cuda" else 0)
    graph_processes = args.graph_processes
    if graph_processes is None:
        graph_processes = max(1, min(8, (os.cpu_count() or 1) - 2)) if device == "cuda" else 0
    options = model_options(args)
    resources = dict(_resource(r) for r in args.resources or [])
    store = Store.open(args.store, mode="r+")
    name = args.name or args.model
    check_settings(name, args.batch_atoms)
    complete = featurize_is_complete(store, args.model, layers, name=name, options=options)
    if complete:  # decided from the store: no model loaded, no cluster started
        progress.say(
            f"features/{name}/{{{','.join(complete)}}}: complete with the weights of "
            f"{args.model}, nothing to do"
        )
        return 0
    if not resources and (get_spec(args.model).package_available() or not _external(args)):
        # one-line errors (model, weights, layers, store) before a cluster starts; a model
        # of another environment is checked on a worker of that environment instead
        check_request(store, args.model, layers, options)
    # worker processes may start graph-builder processes only if they are not daemonic
    daemon = {"distributed.worker.daemon": graph_processes == 0}
    with (
        store_lock(args.store, "dfre featurize"),
        dask.config.set(daemon),
        client_from_args(args) as client,
    ):
        torch_threads = args.torch_threads or _default_torch_threads(client)
        report = featurize(
            args.store,
            args.model,
            layers=layers,
            name=args.name,
            batch_atoms=args.batch_atoms,
            device=device,
            options=options,
            prefetch=prefetch,
            graph_processes=graph_processes,
            torch_threads=torch_threads,
            resources=resources or None,
        )
    print(report.summary())
    return 0


def _external(args) -> bool:
    """Whether the command runs on a cluster started elsewhere (whose workers may come
    from other environments) rather than a local one started from this environment."""
    import dask

    from dfre.cluster import SCHEDULER_ENV

    return bool(
        args.scheduler
        or args.scheduler_file
        or os.environ.get(SCHEDULER_ENV)
        or dask.config.get("scheduler-address", None)
    )


def _default_torch_threads(client) -> int:
    """The CPU cores here shared among the worker processes: a process runs one forward
    pass at a time (the model is shared by its threads), so it may use its whole share."""
    workers = len(client.nthreads()) or 1
    return max(1, (os.cpu_count() or 1) // workers)
