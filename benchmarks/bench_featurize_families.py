"""Benchmark: featurize atoms/s of a user-file model family, direct vs the Dask pipeline.

The same measurement as ``bench_featurize.py`` for the families whose weights come as
a file (uma, metatomic, orb, mattersim, ...), run with the family environment's
python. On a sample store of ``--n-atoms`` atoms (``dfre.data.sample``):

- direct: ``extractor.featurize`` on consecutive batches of whole structures in this
  one process (graphs + forward, torch on every core), after one warm-up batch;
- pipeline: ``dfre.featurize.featurize`` on a local Dask cluster of ``--workers``
  processes (one thread, ``cores / workers`` torch threads each), reading structures
  from and writing features into the store, timed after the model is loaded on every
  worker and a warm-up run.

Prints atoms/s of each, pipeline / direct, and the largest difference between the
pipeline's and the direct features. Random weights for a try without real ones are
made by the family tests' own builders, e.g. (uma environment)::

    .envs/uma/bin/python -c "import sys; sys.path.insert(0, 'tests/families'); \\
        import test_uma; test_uma.random_uma_checkpoint('/tmp/uma.pt')"
    .envs/uma/bin/python benchmarks/bench_featurize_families.py --model uma \\
        --weights /tmp/uma.pt --trust-checkpoint --option task=omat --n-atoms 2000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_featurize import make_store


def loader_options(args) -> dict:
    options = {"path": os.path.abspath(args.weights)}
    if args.trust_checkpoint:
        options["trust_checkpoint"] = True
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = value
    return options


def direct_rate(model: str, options: dict, frames, batch_atoms: int) -> tuple[float, dict]:
    """(graphs + forward atoms/s, features of the structures the model takes)."""
    from dfre.featurize import batches_by_atoms
    from dfre.models.base import load_extractor

    extractor = load_extractor(model, "cpu", **options)
    layers = list(extractor.layers)
    usable = [a for a in frames if extractor.unsupported_reason(a) is None]
    groups = batches_by_atoms([len(a) for a in usable], batch_atoms)
    extractor.featurize([usable[i] for i in groups[0]], layers)  # warm-up
    start = time.perf_counter()
    parts = [extractor.featurize([usable[i] for i in g], layers) for g in groups]
    rate = sum(len(a) for a in usable) / (time.perf_counter() - start)
    return rate, {layer: np.concatenate([p[layer] for p in parts]) for layer in layers}


def warm_up(model: str, options: dict, torch_threads: int) -> None:
    """Load the model in this worker process (what the first task would do)."""
    from dfre.models.base import load_extractor, set_torch_threads

    set_torch_threads(torch_threads)
    load_extractor(model, "cpu", **options)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry name: uma, metatomic, orb, ...")
    p.add_argument("--weights", required=True)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.add_argument("--n-atoms", type=int, default=5000)
    p.add_argument("--batch-atoms", type=int, nargs="+", default=[1024])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    torch_threads = max(1, cores // args.workers)
    options = loader_options(args)

    import torch
    from distributed import Client, LocalCluster

    from dfre.featurize import featurize
    from dfre.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-families-"))
    store = make_store(tmp / "s.zarr", args.n_atoms, chunk_atoms=65536)
    frames = list(store.iter_atoms())
    print(f"# {args.model} {options}, {cores} cores, torch {torch.__version__}", flush=True)
    cluster = LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with cluster, Client(cluster) as client:
        client.run(warm_up, args.model, options, torch_threads)
        warm = make_store(tmp / "warm.zarr", 200, chunk_atoms=65536)
        featurize(warm.path, args.model, options=options, torch_threads=torch_threads)
        for batch_atoms in args.batch_atoms:
            torch.set_num_threads(cores)
            direct, expected = direct_rate(args.model, options, frames, batch_atoms)
            name = f"b{batch_atoms}"
            report = featurize(
                str(store.path),
                args.model,
                name=name,
                batch_atoms=batch_atoms,
                options=options,
                torch_threads=torch_threads,
            )
            layer = "ll" if "ll" in expected else "bb"
            got = Store.open(str(store.path)).features(f"{name}/{layer}").compute()
            diff = float(np.abs(got[~np.isnan(got).any(axis=1)] - expected[layer]).max())
            print(
                f"{args.model:10} batch {batch_atoms:6d} atoms {store.n_atoms:7d}  direct "
                f"{direct:8.0f} atoms/s  pipeline {report.atoms_per_second:8.0f} atoms/s  "
                f"pipeline/direct {report.atoms_per_second / direct:5.2f}  "
                f"max|diff| ({layer}) {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
