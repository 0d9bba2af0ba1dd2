"""Benchmark: how fast the store check decodes a store (``dfre verify``; featurize runs
the same check on its own arrays before planning a re-run).

Writes a store of ``--n-atoms`` rows: the sample structures' layout (random numbers
and positions, one structure per 20 atoms) and ``--features`` float32 feature sets of
``--dim`` columns in chunks of ``--chunk-rows`` (random values: they do not compress,
as real features barely do). Then times :func:`dfre.verify.verify_store` and prints
the bytes decoded per second, plus the time of a second run (file pages cached).

    python benchmarks/bench_verify.py --n-atoms 1000000 --dim 128 --features 2 --workdir DIR
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dfre.store import Store, StructureBlock
from dfre.verify import verify_store


def make_store(path: Path, n_atoms: int, dim: int, n_features: int, chunk: int) -> int:
    """The store; returns the bytes its arrays hold decoded."""
    rng = np.random.default_rng(0)
    counts = np.full(n_atoms // 20, 20)
    counts[-1] += n_atoms - counts.sum()
    store = Store.create(path, chunk_atoms=chunk)
    store.append(
        StructureBlock(
            numbers=rng.integers(1, 90, n_atoms).astype(np.int16),
            positions=rng.normal(size=(n_atoms, 3)) * 10,
            counts=counts,
            cell=np.zeros((len(counts), 3, 3)),
            pbc=np.zeros((len(counts), 3), bool),
        )
    )
    for k in range(n_features):
        array = store.create_feature(f"model-{k}/ll", dim, chunk_atoms=chunk)
        for lo in range(0, n_atoms, chunk):
            hi = min(lo + chunk, n_atoms)
            array[lo:hi] = rng.normal(size=(hi - lo, dim)).astype(np.float32)
    return n_atoms * (2 + 24 + 4 * dim * n_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-atoms", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--workdir", default=None, help="folder for the store (default: /tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        path = Path(folder) / "bench.zarr"
        n_bytes = make_store(path, args.n_atoms, args.dim, args.features, args.chunk_rows)
        on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        store = Store.open(path)
        for label in ("first run", "second run"):
            start = time.perf_counter()
            problems = verify_store(store)
            seconds = time.perf_counter() - start
            assert not problems, problems
            print(
                f"verify, {label}: {seconds:.2f} s for {n_bytes / 1e9:.3f} GB decoded "
                f"({on_disk / 1e9:.3f} GB on disk): {n_bytes / seconds / 1e9:.2f} GB/s"
            )


if __name__ == "__main__":
    main()
