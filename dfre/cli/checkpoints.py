"""``dfre checkpoints``: FRE of each training checkpoint against the final one (Fig. 6)."""

from __future__ import annotations

import argparse

from dfre.cluster import add_cluster_arguments, client_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoints",
        help="FRE of each checkpoint's features against the final checkpoint (training curve)",
        description="Given the feature sets of checkpoints of one model in training order, "
        "compute FRE(checkpoint -> reference) for each and write results/<metric>-checkpoints "
        "(drawn as curves by `dfre report`).",
    )
    p.add_argument("--store", required=True, help="path of the dfre store")
    p.add_argument(
        "--features",
        nargs="+",
        required=True,
        metavar="MODEL/LAYER",
        help="feature sets of the checkpoints, in training order",
    )
    p.add_argument(
        "--epochs", nargs="+", type=float, help="x value (epoch) of each checkpoint (default 0..)"
    )
    p.add_argument("--reference", help="reference feature set (default: the last checkpoint)")
    p.add_argument(
        "--metric",
        action="append",
        choices=("gfre", "lfre"),
        help="gfre and/or lfre (repeat; default both)",
    )
    p.add_argument("--selection", default="stratified:1000", help="test selection spec")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection")
    p.add_argument(
        "--k",
        help="LFRE neighbours: a number, min or max (default min: the smaller dimension per "
        "pair; the paper's Fig. 8 uses max)",
    )
    p.add_argument("--run-prefix", default="", help="prefix of the result names")
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.data.selection import parse_spec
    from dfre.errors import DfreError
    from dfre.lock import store_lock
    from dfre.metrics.lfre import parse_k
    from dfre.store import Store
    from dfre.studies.checkpoints import checkpoint_trajectory

    store = Store.open(args.store, mode="r+")
    for name in args.features:
        store.feature_array(name)  # unknown names fail before a cluster starts
    parse_spec(args.selection)
    k = parse_k(args.k) if args.k is not None else None
    if args.epochs is not None and len(args.epochs) != len(args.features):
        raise DfreError(
            f"{len(args.epochs)} --epochs for {len(args.features)} --features: give one each"
        )
    with store_lock(args.store, "dfre checkpoints"), client_from_args(args):
        for metric in args.metric or ["gfre", "lfre"]:
            run_name = f"{args.run_prefix}{metric}-checkpoints"
            result = checkpoint_trajectory(
                store,
                args.features,
                epochs=args.epochs,
                reference=args.reference,
                metric=metric,
                selection=args.selection,
                seed=args.seed,
                k=k,
                run=run_name,
            )
            column = result.names.index(args.reference or args.features[-1])
            print(f"results/{run_name}: {metric.upper()}(checkpoint -> reference)")
            for name, value in zip(result.names, result.matrix[:, column], strict=True):
                print(f"  {name}: {value:.4f}")
    return 0
