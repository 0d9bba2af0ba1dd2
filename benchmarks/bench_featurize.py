"""Benchmark: featurize pipeline atoms/s against a direct batched model call.

For each model and batch size (atoms per forward pass), on a sample store of
``--n-atoms`` atoms (``dfre.data.sample``):

- direct: the structures in memory, ``extractor.featurize`` on consecutive batches of
  whole structures in this one process (graphs + forward; torch uses every core);
  on ``--device cuda`` also the raw forward rate (graphs built beforehand, timed
  forward passes only, CUDA synchronised);
- pipeline: ``dfre.featurize.featurize`` on a local Dask cluster (``--workers``
  processes with one thread and ``cores / workers`` torch threads each on CPU; one
  dask-cuda worker per GPU with ``--graph-processes`` graph builders on CUDA),
  reading structures from and writing features into the store; timed after the
  models are loaded on every worker and a warm-up run (which also starts the graph
  processes).

Prints atoms/s of each and the ratio pipeline / direct (CPU target >= 0.8; GPU
target: pipeline >= 0.8 x raw forward rate) and the largest difference between the
pipeline's and the direct features.

Small run (a minute):
    python benchmarks/bench_featurize.py --n-atoms 1500 --sevennet-atoms 300
CPU, full size:
    python benchmarks/bench_featurize.py --n-atoms 100000 --sevennet-atoms 20000 \\
        --batch-atoms 512 2048 8192 --workers 2
GPU (device machine):
    python benchmarks/bench_featurize.py --device cuda --n-atoms 400000 \\
        --sevennet-atoms 400000 --batch-atoms 864 3456 13824 27648 --graph-processes 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, n_atoms: int, chunk_atoms: int):
    from dfre.data.sample import write_sample

    return write_sample(path, n_atoms, seed=0, chunk_atoms=chunk_atoms, energies=False)


def direct_rate(model: str, frames, batch_atoms: int, device: str) -> tuple[float, float, dict]:
    """(graphs+forward atoms/s, raw forward atoms/s or nan, features) in this process."""
    from dfre.featurize import batches_by_atoms
    from dfre.models.base import load_extractor

    extractor = load_extractor(model, device)
    layers = list(extractor.layers)
    usable = [a for a in frames if extractor.unsupported_reason(a) is None]
    groups = batches_by_atoms([len(a) for a in usable], batch_atoms)
    extractor.featurize(usable[: len(groups[0])], layers)  # warm-up
    start = time.perf_counter()
    parts = [extractor.featurize([usable[i] for i in g], layers) for g in groups]
    _sync(device)
    full = sum(len(a) for a in usable) / (time.perf_counter() - start)
    raw = float("nan")
    if device.startswith("cuda"):
        batches = [extractor.collate([extractor.graph(usable[i]) for i in g]) for g in groups]
        start = time.perf_counter()
        for batch in batches:
            extractor.forward(batch, layers)
        _sync(device)
        raw = sum(len(a) for a in usable) / (time.perf_counter() - start)
    features = {layer: np.concatenate([p[layer] for p in parts]) for layer in layers}
    return full, raw, {"usable": usable, "features": features}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def warm_up(model: str, device: str, torch_threads: int | None) -> None:
    """Load the model in this worker process (what the first task would do)."""
    from dfre.models.base import load_extractor, set_torch_threads

    set_torch_threads(torch_threads)
    load_extractor(model, device)


def start_client(args):
    import dask
    from distributed import Client, LocalCluster

    if args.device == "cuda":
        from dask_cuda import LocalCUDACluster

        dask.config.set({"distributed.worker.daemon": args.graph_processes == 0})
        cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=":0")
    else:
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=not args.in_process,
            dashboard_address=":0",
        )
    return Client(cluster)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["chgnet-0.3.0", "sevennet-0"])
    p.add_argument("--n-atoms", type=int, default=100_000, help="sample size for CHGNet")
    p.add_argument("--sevennet-atoms", type=int, default=20_000, help="sample for SevenNet")
    p.add_argument("--batch-atoms", type=int, nargs="+", default=[2048])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--graph-processes", type=int, default=None)
    p.add_argument("--prefetch", type=int, default=None)
    p.add_argument("--chunk-atoms", type=int, default=None, help="rows per feature chunk")
    p.add_argument("--warm-atoms", type=int, default=200, help="atoms of the warm-up run")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: thread workers in this process (no worker processes; for quick checks)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (JSON)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.graph_processes is None:
        args.graph_processes = max(1, min(12, cores - 2)) if args.device == "cuda" else 0
    if args.prefetch is None:
        args.prefetch = 2 if args.device == "cuda" else 0
    torch_threads = max(1, cores // args.workers) if args.device == "cpu" else None

    import torch

    from dfre.featurize import featurize
    from dfre.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    print(f"# device {args.device}, {cores} cores, torch {torch.__version__}", flush=True)
    rows = []
    with start_client(args) as client:
        print(
            f"# dask workers: {len(client.nthreads())}, graph processes per worker: "
            f"{args.graph_processes}, prefetch {args.prefetch}",
            flush=True,
        )
        for model in args.models:
            n_atoms = args.sevennet_atoms if model.startswith("sevennet") else args.n_atoms
            path = tmp / f"{model}.zarr"
            store = make_store(path, n_atoms, chunk_atoms=65536)
            frames = list(store.iter_atoms())
            client.run(warm_up, model, args.device, torch_threads)  # load on every worker
            warm = make_store(tmp / f"{model}-warm.zarr", args.warm_atoms, chunk_atoms=65536)
            featurize(
                warm.path,
                model,
                device=args.device,
                torch_threads=torch_threads,
                graph_processes=args.graph_processes,
                prefetch=args.prefetch,
            )
            for batch_atoms in args.batch_atoms:
                torch.set_num_threads(cores)
                full, raw, ref = direct_rate(model, frames, batch_atoms, args.device)
                name = f"b{batch_atoms}"
                report = featurize(
                    str(path),
                    model,
                    name=name,
                    batch_atoms=batch_atoms,
                    device=args.device,
                    torch_threads=torch_threads,
                    graph_processes=args.graph_processes,
                    prefetch=args.prefetch,
                    chunk_atoms=args.chunk_atoms,
                )
                got = Store.open(str(path)).features(f"{name}/ll").compute()
                got = got[~np.isnan(got).any(axis=1)]
                diff = float(np.abs(got - ref["features"]["ll"]).max())
                rows.append(
                    (model, batch_atoms, store.n_atoms, full, raw, report.atoms_per_second, diff)
                )
                print(
                    f"{model:14} batch {batch_atoms:6d} atoms {store.n_atoms:7d}  direct "
                    f"{full:9.0f} atoms/s  raw forward {raw:9.0f}  pipeline "
                    f"{report.atoms_per_second:9.0f} atoms/s  pipeline/direct "
                    f"{report.atoms_per_second / full:5.2f}"
                    + (f"  pipeline/raw {report.atoms_per_second / raw:5.2f}" if raw == raw else "")
                    + f"  max|diff| {diff:.1e}",
                    flush=True,
                )
    for model in args.models:
        best = max((r for r in rows if r[0] == model), key=lambda r: r[5])
        print(f"# {model}: best pipeline rate {best[5]:.0f} atoms/s at --batch-atoms {best[1]}")
    if args.json:
        keys = ("model", "batch_atoms", "atoms", "direct", "raw_forward", "pipeline", "max_diff")
        runs = [dict(zip(keys, row, strict=True)) for row in rows]
        for run in runs:
            run["pipeline_over_direct"] = run["pipeline"] / run["direct"]
            raw = run["raw_forward"]
            run["pipeline_over_raw"] = run["pipeline"] / raw if raw == raw else None
            run["raw_forward"] = raw if raw == raw else None  # NaN is not JSON
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "cores": cores, "runs": runs}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
