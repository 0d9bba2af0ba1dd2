"""``dfre export-chemiscope``: a chemiscope input file of a store for interactive maps."""

from __future__ import annotations

import argparse

from dfre.cli.options import add_store_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export-chemiscope",
        help="write a chemiscope input file (structures, properties, PCovR map coordinates)",
        description="Write FILE (.json or .json.gz) for chemiscope.org: the structures of the "
        "store, their info as properties and the coordinates of PCovR maps.",
    )
    add_store_argument(p)
    p.add_argument("--out", required=True, metavar="FILE", help="output file, e.g. map.json.gz")
    p.add_argument(
        "--map",
        action="append",
        metavar="RUN",
        help="PCovR result to include (repeat; default: every PCovR result)",
    )
    p.add_argument("--max-structures", type=int, help="export at most N structures (random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random structure choice")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.report.chemiscope import export_chemiscope
    from dfre.store import Store

    summary = export_chemiscope(
        Store.open(args.store),
        args.out,
        maps=args.map,
        max_structures=args.max_structures,
        seed=args.seed,
    )
    print(
        f"{summary['path']}: {summary['structures']} structures, {summary['properties']} "
        f"properties, maps: {', '.join(summary['maps']) or 'none'}"
    )
    return 0
