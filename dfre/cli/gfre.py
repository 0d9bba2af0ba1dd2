"""``dfre gfre``: the GFRE matrix of feature sets of a store, written to its results."""

from __future__ import annotations

import argparse
import json

from dfre.cli.options import (
    add_cluster_arguments,
    add_features_argument,
    add_force_argument,
    add_store_argument,
)


def _alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: give numbers separated by commas") from None
    if any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: alphas must be non-negative numbers")
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gfre",
        help="global feature reconstruction errors of every pair of feature sets",
        description="GFRE of every source→target pair of the given feature sets, from one "
        "pass over the store; written to results/<run> and printed with source rows and "
        "target columns. A result made from the same inputs and settings is reused.",
    )
    add_store_argument(p)
    add_features_argument(p, "feature sets to compare (at least two)")
    p.add_argument(
        "--selection",
        default="stratified:1000",
        help="test selection: stratified:N, random:N, structure:N or kfold:K "
        "(default stratified:1000)",
    )
    p.add_argument(
        "--solver",
        choices=("gram", "tsqr"),
        default="gram",
        help="gram: normal equations (fast); tsqr: QR tree for ill-conditioned features",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the selection")
    p.add_argument("--run", default="gfre", help="name of the result group (default gfre)")
    p.add_argument(
        "--no-pointwise",
        action="store_true",
        help="skip the per-environment errors (second pass over the test rows)",
    )
    p.add_argument(
        "--regularization",
        choices=("cutoff", "tikhonov"),
        default="cutoff",
        help="ridge regularisation of skmatter's Ridge2FoldCV (default cutoff)",
    )
    p.add_argument(
        "--alpha-type",
        choices=("relative", "absolute"),
        default="relative",
        help="alphas relative to the largest singular value (default) or absolute",
    )
    p.add_argument(
        "--alphas",
        type=_alphas,
        default=None,
        metavar="A,B,...",
        help="alphas tried by the 2-fold CV (default: 20 from 1e-9 to 0.9, skmatter's)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def format_matrix(names: list[str], matrix) -> str:
    """The matrix as text: one row per source, one column per target."""
    width = max(10, *(len(n) for n in names))
    lines = ["source \\ target".ljust(width) + "".join(n.rjust(width + 2) for n in names)]
    for name, row in zip(names, matrix, strict=True):
        lines.append(name.ljust(width) + "".join(f"{v:{width + 2}.4f}" for v in row))
    return "\n".join(lines)


def run(args) -> int:
    from dfre.cluster import client_from_args
    from dfre.lock import store_lock
    from dfre.metrics.gfre import DEFAULT_ALPHAS
    from dfre.store import Store
    from dfre.studies.steps import Steps

    store = Store.open(args.store, mode="r+")
    steps = Steps(store, cluster=lambda: client_from_args(args), force=args.force)
    with store_lock(args.store, "dfre gfre"), steps:
        steps.compare(
            "gfre",
            args.features,
            args.selection,
            run=args.run,
            seed=args.seed,
            solver=args.solver,
            pointwise=not args.no_pointwise,
            regularization_method=args.regularization,
            alpha_type=args.alpha_type,
            alphas=args.alphas or DEFAULT_ALPHAS,
        )
    result = stored_result(store, args.run)
    if args.json:
        print(
            json.dumps(
                {
                    "run": args.run,
                    "names": result["names"],
                    "selection": args.selection,
                    "gfre": result["matrix"].tolist(),
                    "alpha": result["alpha"].tolist(),
                    "cka": result["cka"].tolist(),
                    "n_test": int(result["n_test"]),
                }
            )
        )
    else:
        print(
            f"GFRE (rows: source, columns: target), selection {args.selection}, "
            f"{result['n_test']} test environments, results/{args.run} of {args.store}"
        )
        print(format_matrix(result["names"], result["matrix"]))
    return 0


def stored_result(store, run: str) -> dict:
    """Names, arrays and test size of ``results/<run>`` as :func:`run` prints them."""
    import numpy as np

    group = store.result(run)
    arrays = {key: np.asarray(group[key][...]) for key in group.array_keys()}
    return {
        "names": list(group.attrs["names"]),
        **arrays,
        "n_test": len(arrays.get("test_rows", ())),
    }
