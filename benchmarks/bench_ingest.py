"""Benchmark: extxyz ingest throughput (atoms per minute) against ASE's own reader.

Writes an extxyz file of sample structures (energy in the header, forces per atom,
subset labels), then times, on the same file:

* ``ase.io.iread`` alone (the reference: parsing without storing anything);
* ``dfre.data.ingest.ingest`` into a fresh store (parse, check, sha256, Zarr writes).

Usage (full size; about 3 minutes here):

    .venv/bin/python benchmarks/bench_ingest.py --n-atoms 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time

import numpy as np


def write_extxyz(path: str, n_atoms: int, seed: int) -> tuple[int, int]:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from dfre.data.sample import sample_structures

    rng = np.random.default_rng(seed)
    n_frames = n_written = 0
    batch = []
    with open(path, "w") as handle:
        for atoms in sample_structures(n_atoms, seed, energies=False):
            atoms.calc = SinglePointCalculator(
                atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3))
            )
            batch.append(atoms)
            n_frames += 1
            n_written += len(atoms)
            if len(batch) == 1000:
                ase.io.write(handle, batch, format="extxyz")
                batch = []
        if batch:
            ase.io.write(handle, batch, format="extxyz")
    return n_frames, n_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-atoms", type=int, default=1_000_000)
    parser.add_argument("--chunk-atoms", type=int, default=1 << 16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="best of N alternated runs")
    parser.add_argument("--workdir", help="where to write the file and store (default: temp)")
    args = parser.parse_args()

    import ase.io

    from dfre.data.ingest import ingest
    from dfre.store import Store

    workdir = args.workdir or tempfile.mkdtemp(prefix="dfre-bench-ingest-")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "sample.xyz")
    store_path = os.path.join(workdir, "store.zarr")
    try:
        start = time.perf_counter()
        n_frames, n_atoms = write_extxyz(path, args.n_atoms, args.seed)
        size = os.path.getsize(path)
        print(
            f"wrote {path}: {n_frames} structures, {n_atoms} atoms, {size / 2**20:.1f} MiB "
            f"in {time.perf_counter() - start:.1f} s"
        )

        start = time.perf_counter()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                hashlib.sha256(block)
        t_hash = time.perf_counter() - start

        # alternate the two measurements and keep the best of each, so that load from
        # other processes on the machine disturbs the ratio as little as possible
        t_ase = t_dfre = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            count = sum(len(atoms) for atoms in ase.io.iread(path, format="extxyz"))
            t_ase = min(t_ase, time.perf_counter() - start)
            assert count == n_atoms

            shutil.rmtree(store_path, ignore_errors=True)
            start = time.perf_counter()
            ingest([path], store_path, chunk_atoms=args.chunk_atoms)
            t_dfre = min(t_dfre, time.perf_counter() - start)
            store = Store.open(store_path)
            assert store.n_atoms == n_atoms and store.n_structures == n_frames

        rate = 60 * n_atoms
        print(f"sha256 of the file         {t_hash:7.2f} s")
        print(f"ase.io.iread alone         {t_ase:7.2f} s  {rate / t_ase / 1e6:6.2f} M atoms/min")
        print(f"dfre ingest                {t_dfre:7.2f} s  {rate / t_dfre / 1e6:6.2f} M atoms/min")
        print(f"ingest / iread time ratio  {t_dfre / t_ase:7.2f}")
        print(f"target 1 M atoms/min: {'met' if rate / t_dfre >= 1e6 else 'NOT met'}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
