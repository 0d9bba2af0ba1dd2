"""``dfre cumulants``: structure-level cumulant descriptors of feature sets in a store."""

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
        "cumulants",
        help="structure-level signed-root cumulant descriptors (orders 1..M) of feature sets",
        description="Write descriptors/cumulants-<model>-<layer>-M<order> for each feature set: "
        "per structure, sign(k)|k|^(1/k) of the cumulants k of orders 1..M of its atomic "
        "features, concatenated. Descriptors and studies made from the same inputs and "
        "settings are reused.",
    )
    add_store_argument(p)
    add_features_argument(
        p, "feature sets (default: every feature set in the store)", required=False
    )
    p.add_argument("--order", type=int, default=8, help="highest cumulant order M (default 8)")
    p.add_argument("--name", help="descriptor name (only with a single --features)")
    p.add_argument(
        "--study",
        nargs="+",
        action="extend",
        choices=("gfre", "lfre"),
        help="also compute the FRE between cumulant orders of each descriptor (Fig. 8) and, "
        "with several feature sets, between their descriptors (Fig. S10): gfre, lfre or both",
    )
    p.add_argument(
        "--selection",
        default="kfold:2",
        help="test structures of --study: random:N, stratified:N, kfold:K (default kfold:2)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --study selection")
    p.add_argument(
        "--k",
        help="LFRE neighbours: a number, min or max (default min: the smaller dimension per "
        "pair; the paper's Fig. 8 uses max)",
    )
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.cluster import client_from_args
    from dfre.descriptors.cumulants import check_order
    from dfre.errors import DfreError
    from dfre.lock import store_lock
    from dfre.metrics.lfre import parse_k
    from dfre.store import Store
    from dfre.studies.steps import Steps, check_structure_selection

    order = check_order(args.order)
    k = parse_k(args.k) if args.k is not None else None
    store = Store.open(args.store, mode="r+")
    names = args.features or store.feature_names()
    if not names:
        raise DfreError(f"store {args.store} has no feature sets: run `dfre featurize` first")
    if args.name and len(names) != 1:
        raise DfreError("--name needs exactly one --features")
    for name in names:
        store.feature_array(name)  # unknown names fail before anything is written
    for metric in args.study or []:  # a bad or too large selection fails before any work
        widths = [order * int(store.feature_array(name).shape[1]) for name in names]
        check_structure_selection(store, args.selection, args.seed, metric, k, widths)

    steps = Steps(store, cluster=lambda: client_from_args(args), force=args.force)
    with store_lock(args.store, f"dfre cumulants --order {order}"), steps:
        descriptors = [
            steps.cumulants(name, order, name=args.name, device="cuda" if args.gpu else "cpu")
            for name in names
        ]
        for name, descriptor in zip(names, descriptors, strict=True):
            print(f"{name} -> descriptors/{descriptor}")
        for metric in dict.fromkeys(args.study or []):
            options = {"metric": metric, "selection": args.selection, "seed": args.seed, "k": k}
            for descriptor in descriptors:
                run = steps.order_study(descriptor, **options)
                print(f"results/{run}: {metric.upper()} between orders")
            if len(descriptors) > 1:
                run = steps.cross_model_cumulants(descriptors, **options)
                print(f"results/{run}: {metric.upper()} between the descriptors")
    return 0
