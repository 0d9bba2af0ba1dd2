"""``dfre cumulants``: structure-level cumulant descriptors of feature sets in a store."""

from __future__ import annotations

import argparse
import sys
import warnings

from dfre.cluster import add_cluster_arguments, client_from_args
from dfre.descriptors.cumulants import (
    CumulantNotice,
    check_order,
    compute_cumulants,
    cross_model_cumulants,
    cumulant_order_study,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cumulants",
        help="structure-level signed-root cumulant descriptors (orders 1..M) of feature sets",
        description="Write descriptors/cumulants-<model>-<layer>-M<order> for each feature set: "
        "per structure, sign(k)|k|^(1/k) of the cumulants k of orders 1..M of its atomic "
        "features, concatenated.",
    )
    p.add_argument("--store", required=True, help="dfre store (path or URL)")
    p.add_argument(
        "--features",
        action="append",
        metavar="MODEL/LAYER",
        help="feature set (repeat for several; default: every feature set in the store)",
    )
    p.add_argument("--order", type=int, default=8, help="highest cumulant order M (default 8)")
    p.add_argument("--name", help="descriptor name (only with a single --features)")
    p.add_argument(
        "--study",
        action="append",
        choices=("gfre", "lfre"),
        help="also compute the FRE between cumulant orders of each descriptor (Fig. 8) and, "
        "with several feature sets, between their descriptors (Fig. S10); repeatable",
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
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.errors import DfreError
    from dfre.lock import store_lock
    from dfre.metrics.lfre import parse_k
    from dfre.store import Store

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
    if args.study:  # a bad or too large selection fails before anything is written
        import numpy as np

        from dfre.data.selection import make_selection

        structures = np.arange(store.n_structures)
        make_selection(
            args.selection, store.n_structures, labels=store.subsets(), groups=structures
        )
    with store_lock(args.store, f"dfre cumulants --order {order}"), client_from_args(args):
        descriptors = []
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CumulantNotice)
                written = compute_cumulants(
                    store, name, order, name=args.name, device="cuda" if args.gpu else "cpu"
                )
            for warning in caught:
                if issubclass(warning.category, CumulantNotice):
                    print(f"dfre: notice: {name}: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
            print(f"{name} -> descriptors/{written}")
            descriptors.append(written)
        for metric in args.study or []:
            options = {
                "metric": metric,
                "selection": args.selection,
                "seed": args.seed,
                "k": k,
            }
            for descriptor in descriptors:
                cumulant_order_study(store, descriptor, **options)
                print(f"results/{metric}-orders-{descriptor}: {metric.upper()} between orders")
            if len(descriptors) > 1:
                cross_model_cumulants(store, descriptors, **options)
                print(f"results/{metric}-cumulants: {metric.upper()} between the descriptors")
    return 0
