"""Synthetic, correlated latent features with MAD-like subset labels, for benchmarks.

Four "models" look at the same atomic environments: each feature set is a different
nonlinear map of a shared latent description of the environment (whose distribution
depends on the environment's subset), plus a model-specific latent part and noise, with
decaying column scales like real network features. So the feature sets are correlated
but not linearly equivalent, and the GFRE matrix is asymmetric, as in the paper.

Rows are generated in fixed blocks of :data:`BLOCK_ROWS` with independent seeds, so
:func:`synthetic_features` (in memory) and :func:`write_synthetic_zarr` (streamed to
disk, bounded memory) give the same numbers for the same ``n`` and ``seed``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

#: The paper's four uMLIPs have latent dimensions 144, 512, 240 and 128.
PAPER_DIMS = (144, 512, 240, 128)
BLOCK_ROWS = 1 << 14
LATENT = 16
PRIVATE = 4
#: MAD-like subsets and their share of the environments.
SUBSETS = (
    "MC3D",
    "MC3D-rattled",
    "MC3D-random",
    "MC2D",
    "SHAKEN",
    "MC3D-surface",
    "MC3D-cluster",
    "bulk-molecular",
)
SUBSET_WEIGHTS = np.array([0.26, 0.18, 0.08, 0.08, 0.10, 0.12, 0.10, 0.08])


def default_names(dims: Sequence[int]) -> list[str]:
    return [f"model{i}-{d}/ll" for i, d in enumerate(dims)]


class _Maps:
    """The fixed (seeded) maps from latents to each feature set."""

    def __init__(self, dims: Sequence[int], seed: int):
        rng = np.random.default_rng([seed, 0x5EED])
        self.dims = list(dims)
        self.shift = rng.normal(scale=0.8, size=(len(SUBSETS), LATENT))
        self.spread = rng.uniform(0.5, 1.5, size=(len(SUBSETS), 1))
        self.maps = []
        for i, d in enumerate(dims):
            shared = rng.normal(size=(LATENT, d)) / np.sqrt(LATENT)
            private = rng.normal(size=(PRIVATE, d)) / np.sqrt(PRIVATE)
            mix = rng.normal(size=(d, d)) / np.sqrt(d)
            column_scale = 1.0 / (1.0 + np.arange(d) / 16.0)
            self.maps.append((shared, private, mix * column_scale, rng.normal(size=d), i % 4))

    def block(self, rows: int, block_seed: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        rng = np.random.default_rng(block_seed)
        labels = rng.choice(len(SUBSETS), size=rows, p=SUBSET_WEIGHTS).astype(np.int8)
        latent = rng.normal(size=(rows, LATENT)) * self.spread[labels] + self.shift[labels]
        out = []
        for shared, private, mix, offset, act in self.maps:
            h = latent @ shared + 0.3 * rng.normal(size=(rows, PRIVATE)) @ private
            h = (
                np.tanh,
                np.sin,
                lambda v: np.log1p(np.exp(-np.abs(v))) + np.maximum(v, 0),
                lambda v: v * np.exp(-0.5 * v**2),
            )[act](h)
            f = h @ mix + offset + 0.02 * rng.normal(size=(rows, len(offset)))
            out.append(f.astype(np.float32))
        return out, labels


@functools.cache
def _maps(dims: tuple[int, ...], seed: int) -> _Maps:
    return _Maps(dims, seed)


def _one_block(dims: tuple[int, ...], seed: int, k: int, rows: int):
    """Block ``k`` (``rows`` rows), with one BLAS thread (blocks run in parallel)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _maps(dims, seed).block(rows, [seed, k])


def iter_blocks(
    n: int, dims: Sequence[int] = PAPER_DIMS, seed: int = 0, processes: int | None = None
) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
    """Yield ``(start_row, feature blocks, subset labels)`` block by block, in order.

    Blocks are independent (seeded by their index), so ``processes`` processes (default:
    one per core) make them in parallel; the numbers do not depend on it.
    """
    dims = tuple(int(d) for d in dims)
    starts = list(range(0, n, BLOCK_ROWS))
    jobs = [(dims, seed, k, min(BLOCK_ROWS, n - start)) for k, start in enumerate(starts)]
    processes = min(processes or os.cpu_count() or 1, len(jobs))
    if processes <= 1:
        for start, job in zip(starts, jobs, strict=True):
            yield (start, *_one_block(*job))
        return
    with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
        for start, (features, labels) in zip(
            starts, pool.map(_one_block, *zip(*jobs, strict=True)), strict=True
        ):
            yield start, features, labels


def synthetic_features(
    n: int, dims: Sequence[int] = PAPER_DIMS, seed: int = 0, processes: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` environments: one float32 (n, d) array per dim, and subset labels (n,) int8."""
    parts = list(iter_blocks(n, dims, seed, processes))
    features = [np.concatenate([p[1][i] for p in parts]) for i in range(len(dims))]
    return features, np.concatenate([p[2] for p in parts])


def write_synthetic_zarr(
    path: str,
    n: int,
    dims: Sequence[int] = PAPER_DIMS,
    seed: int = 0,
    *,
    names: Sequence[str] | None = None,
    chunk_rows: int = 1 << 16,
    processes: int | None = None,
) -> list[str]:
    """Stream the same data to a Zarr v3 group at ``path`` (arrays ``features/<name>``,
    ``labels``), uncompressed, holding only one block in memory. Returns the names."""
    import zarr

    names = list(names or default_names(dims))
    if chunk_rows % BLOCK_ROWS:
        raise ValueError(f"chunk_rows must be a multiple of {BLOCK_ROWS}")
    group = zarr.open_group(path, mode="w", zarr_format=3)
    arrays = [
        group.create_array(
            f"features/{name}",
            shape=(n, d),
            chunks=(chunk_rows, d),
            dtype="float32",
            compressors=None,
        )
        for name, d in zip(names, dims, strict=True)
    ]
    labels = group.create_array(
        "labels", shape=(n,), chunks=(chunk_rows,), dtype="int8", compressors=None
    )
    pending: list[tuple[int, list[np.ndarray], np.ndarray]] = []

    def flush():
        start = pending[0][0]
        stop = start + sum(len(p[2]) for p in pending)
        for i, arr in enumerate(arrays):
            arr[start:stop] = np.concatenate([p[1][i] for p in pending])
        labels[start:stop] = np.concatenate([p[2] for p in pending])
        pending.clear()

    for part in iter_blocks(n, dims, seed, processes):
        pending.append(part)
        if sum(len(p[2]) for p in pending) == chunk_rows:
            flush()
    if pending:
        flush()
    group.attrs.update({"names": names, "dims": list(dims), "seed": seed, "n": n})
    return names


def read_synthetic_zarr(path: str):
    """Names, lazy dask arrays of the feature sets, and the labels of a written group."""
    import dask.array as da
    import zarr

    group = zarr.open_group(path, mode="r")
    names = list(group.attrs["names"])
    arrays = [da.from_zarr(group[f"features/{name}"]) for name in names]
    return names, arrays, np.asarray(group["labels"][...])
