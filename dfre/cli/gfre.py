"""``dfre gfre``: the GFRE matrix of feature sets of a store, written to its results."""

from __future__ import annotations

import argparse
import json

from dfre.cli.results_text import (
    add_alpha_floor_argument,
    diagnostics_lines,
    format_matrix,
    result_json,
)
from dfre.cluster import add_cluster_arguments, client_from_args
from dfre.lock import store_lock
from dfre.metrics.gfre import DEFAULT_ALPHAS, SOLVERS, gfre_store


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
        "target columns.",
    )
    p.add_argument("--store", required=True, help="path of the dfre store")
    p.add_argument(
        "--features",
        nargs="+",
        required=True,
        metavar="MODEL/LAYER",
        help="feature sets to compare (at least two)",
    )
    p.add_argument(
        "--selection",
        default="stratified:1000",
        help="test selection: stratified:N, random:N, structure:N or kfold:K "
        "(default stratified:1000)",
    )
    p.add_argument(
        "--solver",
        choices=SOLVERS,
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
        default=DEFAULT_ALPHAS,
        metavar="A,B,...",
        help="alphas tried by the 2-fold CV (default: 20 from 1e-9 to 0.9, skmatter's)",
    )
    add_alpha_floor_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from dfre.data.selection import selection_for_store
    from dfre.errors import DfreError
    from dfre.store import Store

    store = Store.open(args.store, mode="r+")
    for name in args.features:  # fail on bad input before any cluster starts
        store.feature_array(name)
    if len(args.features) < 2:
        raise DfreError(f"give at least two feature sets to compare (got {args.features})")
    if len(set(args.features)) != len(args.features):
        raise DfreError(f"feature sets are repeated in {args.features}: give each once")
    valid = store.valid_rows(args.features)
    selection = selection_for_store(args.selection, store, seed=args.seed, valid=valid)
    with store_lock(args.store, "dfre gfre"), client_from_args(args):
        result = gfre_store(
            store,
            args.features,
            selection,
            run=args.run,
            seed=args.seed,
            solver=args.solver,
            pointwise=not args.no_pointwise,
            regularization_method=args.regularization,
            alpha_type=args.alpha_type,
            alphas=args.alphas,
            alpha_floor=None if args.alpha_floor == "none" else args.alpha_floor,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "run": args.run,
                    "names": result.names,
                    "selection": args.selection,
                    "gfre": result.matrix.tolist(),
                    "alpha": result.alpha.tolist(),
                    "cka": result.cka.tolist(),
                    "n_test": int(len(result.test_rows)),
                    **result_json(result),
                }
            )
        )
    else:
        print(
            f"GFRE (rows: source, columns: target), selection {args.selection}, "
            f"{len(result.test_rows)} test environments, results/{args.run} of {args.store}"
        )
        print(format_matrix(result.names, result.matrix, result.error))
        for line in diagnostics_lines(result.config):
            print(line)
    return 0
