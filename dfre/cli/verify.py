"""``dfre verify``: decode every chunk of a store and check that its arrays fit together."""

from __future__ import annotations

import argparse
import sys
import time

from dfre.cli.options import add_positional_store_argument, positional_store


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="decode every chunk of a store; name each corrupted or missing chunk",
        description="Check a store: decode every chunk of every array and name each one "
        "that does not decode (array, chunk index, file), check that feature sets, masks "
        "and descriptors have one row per atom or structure, and that chunks recorded as "
        "written exist. Prints one line per problem; exit status 0 when there is none, 2 "
        "otherwise. Read-only: works on stores on read-only file systems.",
    )
    add_positional_store_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.store import Store
    from dfre.verify import corruption_error, store_arrays, verify_store

    store = Store.open(positional_store(args, "give the store to check: dfre verify --store STORE"))
    start = time.perf_counter()
    n_arrays = len(store_arrays(store))
    problems = verify_store(store)
    for problem in problems:
        print(problem)
    sys.stdout.flush()
    if problems:
        raise corruption_error(store, problems)
    seconds = time.perf_counter() - start
    print(
        f"store {store.path}: no problems ({n_arrays} arrays, every chunk decoded, {seconds:.1f} s)"
    )
    return 0
