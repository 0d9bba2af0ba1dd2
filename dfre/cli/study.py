"""``dfre run STUDY.toml``: a whole study (dataset, features, metrics, report) in one command."""

from __future__ import annotations

import argparse
import time

from dfre.cli.options import add_cluster_arguments, add_force_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a study described in a TOML file (dataset, models, metrics, report)",
        description="Build or reuse the store of the study, featurize its models, compute "
        "the GFRE/LFRE comparisons, checkpoint curves, cumulant descriptors and PCovR maps "
        "it lists, and write the report; see dfre.studies.config for the file format.",
    )
    p.add_argument("study", metavar="STUDY.toml", help="study file")
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre import progress
    from dfre.cluster import client_from_args
    from dfre.lock import store_lock
    from dfre.studies.config import load_study, run_study, summary_text

    study = load_study(args.study)

    def log(line: str) -> None:
        progress.say(line, prefix="dfre run")

    start = time.perf_counter()
    with store_lock(study.store, f"dfre run {args.study}", create=True):
        made = run_study(study, log=log, cluster=lambda: client_from_args(args), force=args.force)
    lines = summary_text(made, time.perf_counter() - start)
    print("\n".join([f"dfre run: {lines[0]}", *lines[1:]]))
    return 0
