"""Benchmark: what the cluster layer costs on top of plain Dask.

On one local distributed cluster (``--workers`` processes), times

- startup: ``dfre.cluster.connect()`` until the workers are up, and ``disconnect``;
- a Gram pass ``X^T X`` (float64, ``--n-envs`` x ``--dim``, chunks of ``--chunk`` rows)
  computed with ``dfre.cluster.compute`` (progress fed by the scheduler) against the
  reference ``client.compute(...).result()`` on the same client, median of
  ``--repeats``; prints both, their ratio and the largest difference of the results;
- connecting by scheduler file to the running cluster (what every command on HPC does).

Small run (seconds):  python benchmarks/bench_cluster.py --n-envs 200000
Full size:            python benchmarks/bench_cluster.py --n-envs 4000000 --dim 512 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np

from dfre import cluster


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-envs", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    start = time.perf_counter()
    client = cluster.connect(gpu=False, n_workers=args.workers, dashboard_address=":0", quiet=True)
    client.wait_for_workers(args.workers)
    startup = time.perf_counter() - start
    try:
        x = da.random.default_rng(0).standard_normal(
            (args.n_envs, args.dim), chunks=(args.chunk, args.dim)
        )
        x = client.persist(x)  # time the pass, not the generation of the data
        client.wait_for_workers(args.workers)
        x.sum().compute()
        gram = x.T @ x

        plain, dfre = [], []
        for i in range(args.repeats):  # alternate which goes first
            for run in (0, 1) if i % 2 == 0 else (1, 0):
                t = time.perf_counter()
                if run == 0:
                    ref = client.compute(gram).result()
                    plain.append(time.perf_counter() - t)
                else:
                    (ours,) = cluster.compute(gram, label="gram pass")
                    dfre.append(time.perf_counter() - t)
        diff = float(np.max(np.abs(ours - ref)))

        with tempfile.TemporaryDirectory() as folder:
            scheduler_file = Path(folder) / "scheduler.json"
            scheduler_file.write_text(json.dumps({"address": client.scheduler.address}))
            t = time.perf_counter()
            with cluster.connected(scheduler_file=scheduler_file, quiet=True):
                pass
            by_file = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        cluster.disconnect(client)
        shutdown = time.perf_counter() - t

    t_plain, t_dfre = statistics.median(plain), statistics.median(dfre)
    print(f"gram pass {args.n_envs} x {args.dim} float64, {args.workers} workers, "
          f"{x.numblocks[0]} row chunks")  # fmt: skip
    print(f"  reference client.compute().result(): {t_plain:8.3f} s (median of {args.repeats})")
    print(f"  dfre.cluster.compute with progress:  {t_dfre:8.3f} s")
    print(f"  ratio dfre / reference:              {t_dfre / t_plain:8.3f}")
    print(f"  max |difference|:                    {diff:.3g}")
    print(f"local cluster start {startup:.2f} s, stop {shutdown:.2f} s; "
          f"connect by scheduler file {by_file:.3f} s")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
