"""``dfre pcovr``: a PCovR map of a structure-level descriptor, optionally projecting
other stores into it."""

from __future__ import annotations

import argparse
import contextlib

from dfre.cli.options import add_force_argument, add_store_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pcovr",
        help="PCovR map (2 components, mixing 0.5) of a structure-level descriptor",
        description="Fit a PCovR map of descriptors/<DESCRIPTOR> against the cohesive energy "
        "per atom (or --target KEY) and write results/<run> (coordinates, target). "
        "--project STORE maps the structures of other stores into the same plane.",
    )
    add_store_argument(p, "dfre store the map is fitted on")
    p.add_argument("--descriptor", required=True, help="descriptor name, e.g. cumulants-m-ll-M8")
    p.add_argument(
        "--target",
        default=None,
        help="cohesive_energy (default: the cohesive energy per atom, from the energies) or "
        "a numeric structure info key",
    )
    p.add_argument("--energy-key", default="energy", help="structure info key of total energies")
    p.add_argument("--mixing", type=float, default=0.5, help="PCovR mixing alpha (default 0.5)")
    p.add_argument("--components", type=int, default=2, help="number of components (default 2)")
    p.add_argument("--run", help="results group name (default pcovr-<descriptor>)")
    p.add_argument(
        "--max-fit",
        type=int,
        default=None,
        help="fit on at most N random structures (default: dfre.projection.DEFAULT_MAX_FIT); "
        "all are projected",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fitting subset")
    p.add_argument(
        "--remove-outliers",
        action="store_true",
        help="drop the structures IsolationForest (contamination 1e-4, random_state 42, as "
        "the paper's notebook) calls outliers from the fit; they are still projected",
    )
    p.add_argument(
        "--project",
        action="append",
        default=[],
        metavar="STORE",
        help="another store (with the same descriptor) to project into the map; repeatable",
    )
    add_force_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.errors import DfreError
    from dfre.lock import store_lock
    from dfre.projection.pcovr import COHESIVE_ENERGY, DEFAULT_MAX_FIT, pcovr_map
    from dfre.store import Store
    from dfre.studies.steps import Steps

    target = args.target or COHESIVE_ENERGY
    max_fit = DEFAULT_MAX_FIT if args.max_fit is None else args.max_fit
    if not 0.0 <= args.mixing <= 1.0:
        raise DfreError(f"--mixing must lie in [0, 1] (got {args.mixing})")
    if args.components < 1:
        raise DfreError(f"--components must be >= 1 (got {args.components})")
    store = Store.open(args.store, mode="r+")
    others = [Store.open(path, mode="r+") for path in args.project]
    if max_fit < 3:
        raise DfreError(f"--max-fit must be at least 3 (got {max_fit})")
    options = {
        "target": target,
        "energy_key": args.energy_key,
        "mixing": args.mixing,
        "n_components": args.components,
        "max_fit": max_fit,
        "seed": args.seed,
        "remove_outliers": args.remove_outliers,
    }
    run_name = args.run or f"pcovr-{args.descriptor}"
    with contextlib.ExitStack() as locks:
        for path in [args.store, *args.project]:
            locks.enter_context(store_lock(path, f"dfre pcovr --descriptor {args.descriptor}"))
        if others:  # a map projected into other stores is always made afresh
            pcovr_map(store, args.descriptor, run=run_name, project_into=others, **options)
        else:
            with Steps(store, force=args.force) as steps:
                steps.pcovr(args.descriptor, run=run_name, **options)
    config = store.result(run_name).attrs["config"]
    print(
        f"results/{run_name}: PCovR of {args.descriptor} on {config['n_fit']} structures "
        f"(target {config['target']}), projected into {len(others)} other store(s)"
    )
    return 0
