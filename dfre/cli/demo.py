"""``dfre demo``: the paper's analyses on the embedded sample dataset with every shipped model.

The demo is the study file ``dfre/studies/demo.toml`` run by ``dfre run``, with the store,
report folder, size and models given here (see :mod:`dfre.studies.demo`).
"""

from __future__ import annotations

import argparse
import time

from dfre.cli.options import add_cluster_arguments, add_force_argument


def add_parser(subparsers) -> None:
    from dfre.studies.demo import demo_defaults, demo_models

    defaults = demo_defaults()
    p = subparsers.add_parser(
        "demo",
        help="sample dataset -> features of every shipped model -> GFRE/LFRE, cumulants, "
        "PCovR -> report",
        description="Run the demo study on a local Dask cluster (or the one given): build "
        "the embedded sample dataset, extract backbone and last-layer features of the "
        "pretrained models, compute cross-model, variant, fine-tune and backbone-vs-last-"
        "layer GFRE/LFRE matrices, cumulant descriptors and PCovR maps, and write the "
        "report. A re-run reuses the store and computes only what is missing.",
    )
    p.add_argument(
        "--atoms",
        type=int,
        default=defaults["atoms"],
        metavar="N",
        help=f"atoms of the sample dataset (default {defaults['atoms']})",
    )
    p.add_argument(
        "--store",
        default=defaults["store"],
        metavar="PATH",
        help=f"the demo's store, reused if it exists (default {defaults['store']})",
    )
    p.add_argument(
        "--out",
        default=defaults["out"],
        metavar="DIR",
        help=f"report folder, also gets the study file that was run (default {defaults['out']})",
    )
    p.add_argument(
        "--models",
        type=_model_list,
        default=None,
        metavar="A,B,...",
        help=f"comma-separated subset of the models (default all: {','.join(demo_models())})",
    )
    add_force_argument(p)
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def _model_list(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise argparse.ArgumentTypeError("give at least one model, e.g. chgnet-0.3.0,sevennet-0")
    return models


def run(args: argparse.Namespace) -> int:
    from dfre import progress
    from dfre.cluster import client_from_args
    from dfre.lock import store_lock
    from dfre.studies.config import summary_text
    from dfre.studies.demo import run_demo, write_demo_study

    # Check every argument (and an existing store) before a cluster starts.
    write_demo_study(args.store, args.out, atoms=args.atoms, models=args.models)

    def log(line: str) -> None:
        progress.say(line, prefix="dfre demo")

    start = time.perf_counter()
    with store_lock(args.store, "dfre demo", create=True):
        made = run_demo(
            args.store,
            args.out,
            atoms=args.atoms,
            models=args.models,
            log=log,
            cluster=lambda: client_from_args(args),
            force=args.force,
        )
    lines = summary_text(made, time.perf_counter() - start)
    lines.append(f"study file: {made['study']} (repeat with `dfre run {made['study']}`)")
    print("\n".join([f"dfre demo: {lines[0]}", *lines[1:]]))
    return 0
