"""``dfre sample``: write the embedded sample dataset (built from ASE) into a store."""

from __future__ import annotations

import argparse
import contextlib
import math

from dfre.cli.options import add_cluster_arguments, add_store_argument
from dfre.defaults import CHUNK_ATOMS as DEFAULT_CHUNK_ATOMS

#: Below this many atoms the sample is built in this process, without a cluster.
LOCAL_ATOMS = 200_000


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="write the embedded MAD-like sample dataset (from ASE) into a store",
        description="Append at least --atoms atoms of sample structures (bulk, rattled bulk, "
        "vacancies, surfaces, clusters, molecules, random alloys; EMT energies for EMT metals) "
        f"to the store, the same for the same --seed. Samples of {LOCAL_ATOMS} atoms or more, "
        "or any cluster option, use a Dask cluster.",
    )
    add_store_argument(p, "dfre store (created if absent)")
    p.add_argument(
        "--atoms", type=_count, default=2000, metavar="N", help="atoms (default 2000; 1e6 works)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    p.add_argument(
        "--energies",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMT energies for structures of EMT metals (--no-energies: about 5x faster)",
    )
    p.add_argument(
        "--subsets",
        metavar="NAME=W,...",
        help="draw only the subsets named, with these relative weights (e.g. "
        "bulk=2,molecules=1: more, smaller structures); default: every subset",
    )
    p.add_argument(
        "--chunk-atoms",
        type=int,
        default=DEFAULT_CHUNK_ATOMS,
        metavar="N",
        help=f"atoms per chunk of a new store (default {DEFAULT_CHUNK_ATOMS})",
    )
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def _count(text: str) -> int:
    """A whole number, also written like 1e6."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def parse_subsets(text: str) -> dict[str, float]:
    """``"bulk=2,molecules=1"`` as ``{"bulk": 2.0, "molecules": 1.0}``, checked by
    :func:`dfre.data.sample.subset_probabilities` (one-line errors)."""
    from dfre.data.sample import subset_probabilities
    from dfre.errors import DfreError

    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, weight = (part.strip() for part in item.partition("="))
        try:
            value = float(weight) if sep and name else None
        except ValueError:
            value = None
        if value is None:
            raise DfreError(
                f"--subsets {text!r}: write NAME=WEIGHT pairs separated by commas, "
                "e.g. bulk=2,molecules=1"
            )
        if name in weights:
            raise DfreError(f"--subsets {text!r} names {name} twice: give each subset once")
        weights[name] = value
    subset_probabilities(weights, what="--subsets")
    return weights


def _wants_cluster(args: argparse.Namespace) -> bool:
    asked = any(getattr(args, k, None) for k in ("scheduler", "scheduler_file", "workers"))
    return asked or args.atoms >= LOCAL_ATOMS


def run(args: argparse.Namespace) -> int:
    from dfre.cluster import client_from_args
    from dfre.data.sample import check_sample_size, write_sample
    from dfre.errors import DfreError
    from dfre.lock import store_lock

    subsets = None if args.subsets is None else parse_subsets(args.subsets)
    check_sample_size(args.store, args.atoms)  # before a cluster starts
    if args.chunk_atoms < 1:
        raise DfreError(f"--chunk-atoms must be a positive number, not {args.chunk_atoms}")
    cluster = client_from_args(args) if _wants_cluster(args) else contextlib.nullcontext()
    with store_lock(args.store, f"dfre sample --atoms {args.atoms}", create=True), cluster:
        store = write_sample(
            args.store,
            args.atoms,
            args.seed,
            chunk_atoms=args.chunk_atoms,
            energies=args.energies,
            subsets=subsets,
            log=print,
        )
    print(f"{store.path}: {store.n_structures} structures, {store.n_atoms} atoms")
    return 0
