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
from dfre.cli.results_text import (
    add_alpha_floor_argument,
    diagnostics_lines,
    format_matrix,
    result_json,
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
        choices=("auto", "gram", "tsqr"),
        default="auto",
        help="auto (default): normal equations, plus the exact QR pass where a feature "
        "set's spectrum needs it; gram: normal equations only; tsqr: QR tree only",
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
    add_alpha_floor_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


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
            alpha_floor=None if args.alpha_floor == "none" else args.alpha_floor,
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
                    **result_json(result),
                }
            )
        )
    else:
        print(
            f"GFRE (rows: source, columns: target), selection {args.selection}, "
            f"{result['n_test']} test environments, results/{args.run} of {args.store}"
        )
        print(format_matrix(result["names"], result["matrix"], result.get("error")))
        for line in diagnostics_lines(result["config"]):
            print(line)
    return 0


def stored_result(store, run: str) -> dict:
    """Names, arrays and test size of ``results/<run>`` as :func:`run` prints them."""
    import numpy as np

    group = store.result(run)
    arrays = {key: np.asarray(group[key][...]) for key in group.array_keys()}
    return {
        "names": list(group.attrs["names"]),
        "config": dict(group.attrs.get("config", {})),
        **arrays,
        "n_test": len(arrays.get("test_rows", ())),
    }
