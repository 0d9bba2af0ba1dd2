"""``dfre report``: figures (PNG, SVG) and one HTML page of a store's results."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="figures (PNG, SVG) and a self-contained HTML page of the results in a store",
        description="Heat maps of GFRE/LFRE results (values in cells), per-subset and "
        "per-element breakdowns, PCovR maps and checkpoint curves, written to --out with "
        "index.html showing them all with each run's configuration.",
    )
    p.add_argument("--store", required=True, help="dfre store (path or URL)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--run", action="append", metavar="NAME", help="results/NAME to show (repeat; default all)"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.report import make_report
    from dfre.store import Store

    report = make_report(Store.open(args.store), args.out, args.run)
    print(f"{report.html}: {len(report.figures) // 2} figures (PNG and SVG) in {args.out}")
    for skipped in report.skipped:
        print(
            f"dfre: notice: results/{skipped} has no known kind and is not shown", file=sys.stderr
        )
    return 0
