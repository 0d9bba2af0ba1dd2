"""Benchmark: featurize atoms/s of any model family on CPU, direct call against the Dask
pipeline, run with the python of the family's environment (``.envs/<family>``).

On a sample store of ``--n-atoms`` atoms (``dfre.data.sample``), for each batch size:

- direct: ``extractor.featurize`` on consecutive batches of whole structures in this
  one process (torch uses every core);
- pipeline: ``dfre.featurize.featurize`` on a local Dask cluster of ``--workers``
  processes (one thread, ``cores / workers`` torch threads each), timed after the model
  is loaded on every worker and a warm-up run.

Prints both rates, the ratio pipeline / direct and the largest difference between the
pipeline's and the direct ``ll`` features. The model is given as for ``dfre featurize``
(``--model``, ``--weights``, ``--option KEY=VALUE``, ``--trust-checkpoint``), or made
with ``--random mace|dpa``: random weights at the size of a released model (MACE-MP-0b3
medium; DPA-3.1-3M, head MPtrj) on the elements of the sample, built with the package's
own code (``tests/families/random_models.py``).

    .envs/mace/bin/python benchmarks/bench_family_featurize.py --random mace --n-atoms 1000
    .envs/dpa/bin/python benchmarks/bench_family_featurize.py --random dpa --n-atoms 1000
    .envs/mace/bin/python benchmarks/bench_family_featurize.py --model mace \\
        --weights mace-mp-0b3-medium.model --trust-checkpoint --n-atoms 20000
    .venv/bin/python benchmarks/bench_family_featurize.py --model chgnet-0.3.0

Random weights of the other families come from their tests' own builders, e.g. (uma
environment; likewise ``random_pet_export``, ``random_orb_weights`` and
``random_mattersim_checkpoint`` of ``test_metatomic``, ``test_orb``, ``test_mattersim``)::

    .envs/uma/bin/python -c "import sys; sys.path.insert(0, 'tests/families'); \\
        import test_uma; test_uma.random_uma_checkpoint('/tmp/uma.pt')"
    .envs/uma/bin/python benchmarks/bench_family_featurize.py --model uma \\
        --weights /tmp/uma.pt --trust-checkpoint --option task=omat --n-atoms 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_featurize import direct_rate, make_store, warm_up

RANDOM_MODELS = Path(__file__).resolve().parents[1] / "tests" / "families"


def random_model(family: str, folder: Path, numbers: np.ndarray) -> tuple[str, dict]:
    """(registry name, loader options) of a random model of a released model's size."""
    sys.path.insert(0, str(RANDOM_MODELS))
    import random_models
    from ase.data import chemical_symbols

    elements = sorted({int(z) for z in numbers})
    if family == "mace":
        path = random_models.build_mace(
            folder / "mace-mp-medium-random.model", elements, **random_models.MACE_MP_MEDIUM
        )
        return "mace", {"path": path, "trust_checkpoint": True}
    if family == "dpa":
        heads = ["OMat24", "MPtrj", "OC20", "ODAC", "SPICE"]
        symbols = [chemical_symbols[z] for z in elements]
        built = random_models.build_dpa3(folder, heads, symbols, **random_models.DPA3_3M)
        return "dpa", {"path": built["pt"], "head": "MPtrj"}
    raise SystemExit(f"--random {family}: choose mace or dpa")


def parse_options(args) -> dict:
    options = {}
    if args.weights:
        options["path"] = os.path.abspath(args.weights)
    if args.trust_checkpoint:
        options["trust_checkpoint"] = True
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = value
    return options


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="registry name (dfre models), e.g. mace, dpa, uma")
    p.add_argument("--weights", default=None, help="model file, for user-file models")
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.add_argument("--random", choices=("mace", "dpa"), default=None)
    p.add_argument("--n-atoms", type=int, default=2000)
    p.add_argument("--batch-atoms", type=int, nargs="+", default=[1024])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if not args.model and not args.random:
        p.error("give --model (with --weights ...) or --random mace|dpa")
    cores = os.cpu_count() or 1
    torch_threads = max(1, cores // args.workers)

    import torch
    from distributed import Client, LocalCluster

    from dfre.featurize import featurize
    from dfre.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-family-"))
    store = make_store(tmp / "s.zarr", args.n_atoms, chunk_atoms=65536)
    frames = list(store.iter_atoms())
    if args.random:
        model, options = random_model(args.random, tmp, store.numbers())
    else:
        model, options = args.model, parse_options(args)
    print(f"# {model} {options}; {cores} cores, torch {torch.__version__}", flush=True)
    cluster = LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with cluster, Client(cluster) as client:
        client.run(warm_up, model, "cpu", torch_threads, options)
        warm = make_store(tmp / "warm.zarr", 200, chunk_atoms=65536)
        featurize(warm.path, model, options=options, torch_threads=torch_threads)
        for batch_atoms in args.batch_atoms:
            torch.set_num_threads(cores)
            direct, _, ref = direct_rate(model, frames, batch_atoms, "cpu", options)
            name = f"b{batch_atoms}"
            report = featurize(
                store.path,
                model,
                name=name,
                batch_atoms=batch_atoms,
                options=options,
                torch_threads=torch_threads,
            )
            got = Store.open(store.path).features(f"{name}/ll").compute()
            got = got[~np.isnan(got).any(axis=1)]
            diff = float(np.abs(got - ref["features"]["ll"]).max())
            n_atoms = sum(len(a) for a in ref["usable"])
            print(
                f"{model:10} batch {batch_atoms:6d} atoms {n_atoms:7d}  direct {direct:8.1f} "
                f"atoms/s  pipeline ({args.workers} workers) {report.atoms_per_second:8.1f} "
                f"atoms/s  pipeline/direct {report.atoms_per_second / direct:5.2f}  "
                f"max|diff| {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
