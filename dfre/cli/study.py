"""``dfre run STUDY.toml``: a whole study (dataset, features, metrics, report) in one command."""

from __future__ import annotations

import argparse
import sys

from dfre.cluster import add_cluster_arguments, client_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a study described in a TOML file (dataset, models, metrics, report)",
        description="Build or reuse the store of the study, featurize its models, compute "
        "the GFRE/LFRE comparisons, checkpoint curves, cumulant descriptors and PCovR maps "
        "it lists, and write the report; see dfre.studies.config for the file format.",
    )
    p.add_argument("study", metavar="STUDY.toml", help="study file")
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.lock import store_lock
    from dfre.studies.config import load_study, run_study

    study = load_study(args.study)

    def log(line: str) -> None:
        print(f"dfre run: {line}", file=sys.stderr)

    with store_lock(study.store, f"dfre run {args.study}", create=True), client_from_args(args):
        made = run_study(study, log=log)
    print(
        f"store {made['store']}: {len(made['results'])} results, "
        f"{len(made['descriptors'])} descriptors"
    )
    if "report" in made:
        print(f"report: {made['report']}")
    return 0
