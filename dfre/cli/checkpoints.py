"""``dfre checkpoints``: FRE of each training checkpoint against the final one (Fig. 6)."""

from __future__ import annotations

import argparse

from dfre.cli.options import (
    add_cluster_arguments,
    add_features_argument,
    add_force_argument,
    add_store_argument,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoints",
        help="FRE of each checkpoint's features against the final checkpoint (training curve)",
        description="Given the feature sets of checkpoints of one model in training order, "
        "compute FRE(checkpoint -> reference) for each and write results/<metric>-checkpoints "
        "(drawn as curves by `dfre report`).",
    )
    add_store_argument(p)
    add_features_argument(p, "feature sets of the checkpoints, in training order")
    p.add_argument(
        "--epochs", nargs="+", type=float, help="x value (epoch) of each checkpoint (default 0..)"
    )
    p.add_argument("--reference", help="reference feature set (default: the last checkpoint)")
    p.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        choices=("gfre", "lfre"),
        help="gfre, lfre or both (default both)",
    )
    p.add_argument("--selection", default="stratified:1000", help="test selection spec")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection")
    p.add_argument(
        "--k",
        help="LFRE neighbours: a number, min or max (default min: the smaller dimension per "
        "pair; the paper's Fig. 8 uses max)",
    )
    p.add_argument("--run-prefix", default="", help="prefix of the result names")
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.cluster import client_from_args
    from dfre.data.selection import parse_spec
    from dfre.errors import DfreError
    from dfre.lock import store_lock
    from dfre.metrics.lfre import parse_k
    from dfre.store import Store
    from dfre.studies.steps import Steps

    store = Store.open(args.store, mode="r+")
    for name in args.features:
        store.feature_array(name)  # unknown names fail before a cluster starts
    parse_spec(args.selection)
    k = parse_k(args.k) if args.k is not None else None
    if args.epochs is not None and len(args.epochs) != len(args.features):
        raise DfreError(
            f"{len(args.epochs)} --epochs for {len(args.features)} --features: give one each"
        )
    steps = Steps(store, cluster=lambda: client_from_args(args), force=args.force)
    with store_lock(args.store, "dfre checkpoints"), steps:
        for metric in dict.fromkeys(args.metric or ["gfre", "lfre"]):
            run_name = f"{args.run_prefix}{metric}-checkpoints"
            steps.checkpoints(
                metric,
                args.features,
                run=run_name,
                epochs=args.epochs,
                reference=args.reference,
                selection=args.selection,
                seed=args.seed,
                k=k,
            )
            group = store.result(run_name)
            names = list(group.attrs["names"])
            column = names.index(args.reference or args.features[-1])
            print(f"results/{run_name}: {metric.upper()}(checkpoint -> reference)")
            for name, value in zip(names, group["matrix"][...][:, column], strict=True):
                print(f"  {name}: {value:.4f}")
    return 0
