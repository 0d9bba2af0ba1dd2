"""``dfre lfre``: the LFRE matrix of feature sets of a store, written to its results."""

from __future__ import annotations

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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lfre",
        help="local feature reconstruction errors of every pair of feature sets",
        description="LFRE of every source→target pair of the given feature sets (exact kNN "
        "per source, batched local ridge per neighbourhood, as scikit-matter); written to "
        "results/<run> with the per-environment errors and printed with source rows and "
        "target columns. A result made from the same inputs and settings is reused.",
    )
    add_store_argument(p)
    add_features_argument(p, "feature sets to compare")
    p.add_argument(
        "--k",
        default=None,
        help="neighbours per environment: a number, min or max (default min: min(d_F, d_F') "
        "per pair, as the paper's model comparisons; max: as its Fig. 8)",
    )
    p.add_argument(
        "--selection",
        default="stratified:1000",
        help="test selection: stratified:N, random:N, structure:N or kfold:K (full dataset: "
        "every environment tested once) (default stratified:1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the selection")
    p.add_argument("--run", default="lfre", help="name of the result group (default lfre)")
    p.add_argument(
        "--breakdown",
        choices=("subset", "element"),
        help="also print the RMSE per subset or per element of every pair",
    )
    add_alpha_floor_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from dfre.cli.gfre import stored_result
    from dfre.cluster import client_from_args
    from dfre.errors import DfreError
    from dfre.linalg.backend import gpu_available
    from dfre.lock import store_lock
    from dfre.metrics.breakdown import breakdown
    from dfre.metrics.lfre import parse_k
    from dfre.store import Store
    from dfre.studies.steps import Steps

    k = parse_k(args.k) if args.k is not None else None
    if isinstance(k, int) and k < 2:
        raise DfreError(f"--k {k}: the local 2-fold ridge needs at least 2 neighbours")
    store = Store.open(args.store, mode="r+")
    gpu = getattr(args, "gpu", None)
    device = "cuda" if gpu or (gpu is None and gpu_available()) else None
    steps = Steps(store, cluster=lambda: client_from_args(args), force=args.force)
    with store_lock(args.store, "dfre lfre"), steps:
        steps.compare(
            "lfre", args.features, args.selection, run=args.run, seed=args.seed, k=k,
            device=device,
            alpha_floor=None if args.alpha_floor == "none" else args.alpha_floor,
        )  # fmt: skip
    result = stored_result(store, args.run)
    table = breakdown(store, args.run, args.breakdown) if args.breakdown else None
    if args.json:
        out = {
            "run": args.run,
            "names": result["names"],
            "selection": args.selection,
            "lfre": result["matrix"].tolist(),
            "k": result["k"].tolist(),
            "alpha": result["alpha"].tolist(),
            "n_test": int(result["n_test"]),
            **result_json(result),
        }
        if table is not None:
            out["breakdown"] = {"by": args.breakdown, "rows": table.to_dict(orient="records")}
        print(json.dumps(out))
        return 0
    print(
        f"LFRE (rows: source, columns: target), selection {args.selection}, "
        f"{result['n_test']} test environments, results/{args.run} of {args.store}"
    )
    print(format_matrix(result["names"], result["matrix"], result.get("error")))
    for line in diagnostics_lines(result["config"]):
        print(line)
    if table is not None:
        print(f"\nRMSE per {args.breakdown}:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0
