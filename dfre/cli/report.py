"""``dfre report``: figures (PNG, SVG) and one HTML page of a store's results."""

from __future__ import annotations

import argparse
import sys

from dfre.cli.options import add_store_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="figures (PNG, SVG) and a self-contained HTML page of the results in a store",
        description="Heat maps of GFRE/LFRE results (values in cells), per-subset and "
        "per-element breakdowns, PCovR maps and checkpoint curves, written to --out with "
        "index.html showing them all with each run's configuration.",
    )
    add_store_argument(p)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--run",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="results/NAME to show (default all)",
    )
    p.add_argument(
        "--min-count",
        type=int,
        default=None,
        metavar="N",
        help="breakdowns leave out subsets and elements with fewer than N test environments "
        "(default 10): their errors are too noisy to compare",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.errors import DfreError
    from dfre.report import DEFAULT_MIN_COUNT, make_report
    from dfre.store import Store

    min_count = DEFAULT_MIN_COUNT if args.min_count is None else args.min_count
    if min_count < 1:
        raise DfreError(f"--min-count must be at least 1 (got {min_count})")
    report = make_report(Store.open(args.store), args.out, args.run, min_count=min_count)
    print(f"{report.html}: {len(report.figures) // 2} figures (PNG and SVG) in {args.out}")
    for skipped in report.skipped:
        print(
            f"dfre: notice: results/{skipped} has no known kind and is not shown", file=sys.stderr
        )
    return 0
