"""``dfre cumulants``: structure-level cumulant descriptors of feature sets in a store."""

from __future__ import annotations

import argparse
import sys
import warnings

from dfre.cluster import add_cluster_arguments, client_from_args
from dfre.descriptors.cumulants import CumulantNotice, check_order, compute_cumulants


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
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.errors import DfreError
    from dfre.lock import store_lock
    from dfre.store import Store

    order = check_order(args.order)
    store = Store.open(args.store, mode="r+")
    names = args.features or store.feature_names()
    if not names:
        raise DfreError(f"store {args.store} has no feature sets: run `dfre featurize` first")
    if args.name and len(names) != 1:
        raise DfreError("--name needs exactly one --features")
    for name in names:
        store.feature_array(name)  # unknown names fail before anything is written
    with store_lock(args.store, f"dfre cumulants --order {order}"), client_from_args(args):
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CumulantNotice)
                written = compute_cumulants(store, name, order, name=args.name)
            for warning in caught:
                if issubclass(warning.category, CumulantNotice):
                    print(f"dfre: notice: {name}: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
            print(f"{name} -> descriptors/{written}")
    return 0
