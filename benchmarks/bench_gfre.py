"""GFRE benchmark: dfre's one-pass 4x4 matrix against skmatter called pair by pair.

6a (default): ``--n-envs`` synthetic environments with feature dims 144/512/240/128
(``synthetic.py``), a stratified test set of ``--test`` environments; dfre computes the
whole matrix (with pointwise errors) in a separate process whose peak RSS is read from
``ru_maxrss``; skmatter's ``global_reconstruction_error`` runs on ``--reference-pairs``
pairs (float64; every source in turn, off-diagonal first) and its 16-pair total is
measured or, when fewer pairs ran, extrapolated from the per-pair mean (labelled so).
Full size:

    python benchmarks/bench_gfre.py --n-envs 258000 --reference-pairs 16

6b (``--out-of-core N``): streams N x (512, 144) float32 features to a Zarr store on disk
(``--workdir``) and computes their 2x2 matrix (random:1000 test set) with bounded RSS:

    python benchmarks/bench_gfre.py --out-of-core 10000000 --workdir /scratch/dfre-bench

Ill-conditioned features (``--decay 1e-10``): every feature set is mapped (in float64)
by a fixed orthogonal rotation times column scales from 1 down to ``decay``, so its
singular values spread over ten more decades, like the last-layer features of real
models. dfre's default ``solver="auto"`` then detects the spectra in the Gram pass and
adds the exact TSQR pass; the script reports which path ran. ``--solver gram`` shows
what the normal equations alone would give.

6c (``--device cuda``): the dfre part with CuPy chunks already in GPU memory; prints the
Gram pass's effective float64 throughput (2 n D^2 flops per pass, best of three after a
warm-up) and, measured in the same process on the same device, the float64 GEMM rate
(square 8192 products, and products of the Gram pass's own shape). Use enough rows to
fill the GPU, e.g.

    python benchmarks/bench_gfre.py --device cuda --n-envs 2000000 --chunk-rows 262144 \
        --threads 4 --reference-pairs 0

``--pass-rate`` measures the same on the CPU (data in memory), ``--json FILE`` writes
every figure to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import PAPER_DIMS, read_synthetic_zarr, write_synthetic_zarr  # noqa: E402


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _selection(spec: str, labels: np.ndarray, seed: int):
    from dfre.data.selection import make_selection

    return make_selection(spec, len(labels), labels=labels, seed=seed)


def ill_conditioned(arrays: list, decay: float, seed: int) -> list:
    """Each set times a fixed ``Q diag(geomspace(1, decay, d))`` (float64, lazily)."""
    out = []
    for i, a in enumerate(arrays):
        d = a.shape[1]
        rng = np.random.default_rng([seed, 0xDECA1, i])
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        transform = q * np.geomspace(1.0, decay, d)
        out.append(a.map_blocks(lambda b, t=transform: b.astype(np.float64) @ t, dtype=np.float64))
    return out


def _device(name: str):
    """(array module, synchronise) of the device ``name``."""
    if name == "cuda":
        import cupy

        return cupy, cupy.cuda.Device().synchronize
    return np, lambda: None


def gemm_tflops(xp, sync, m: int, k: int, n: int, repeats: int = 5) -> float:
    """float64 TFLOP/s of ``(m, k) @ (k, n)`` products on ``xp``'s device, best of
    ``repeats`` after a warm-up (2 m k n flops each)."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.random((m, k)))
    b = xp.asarray(rng.random((k, n)))
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e12


def pass_rate(arrays, selection, config: dict) -> dict:
    """The Gram pass over device-resident rows (best of three after a warm-up) against the
    float64 GEMM rate of the same device, measured here."""
    import dask

    from dfre.linalg.gram import GPU_SUB_BLOCK_ROWS, SUB_BLOCK_ROWS, group_statistics
    from dfre.metrics.gfre import GROUPS_PER_FOLD, _concatenate, fold_labels

    xp, sync = _device(config["device"])
    (z,) = dask.persist(_concatenate(list(arrays)))  # the concatenated rows, on the device
    sync()
    labels = fold_labels([(selection.train, selection.test)], z.shape[0])
    pass_solver = "tsqr" if config["solver"] == "tsqr" else "gram"  # auto's first pass: Gram
    times = []
    for _ in range(4):  # the first run compiles CuPy kernels: best of the next three
        start = time.perf_counter()
        group_statistics(z, labels, GROUPS_PER_FOLD, solver=pass_solver)
        sync()
        times.append(time.perf_counter() - start)
    t_pass = min(times[1:])
    n_used = len(selection.train) + len(selection.test)
    d = z.shape[1]
    square = 8192 if xp is not np else 1024
    rows = min(GPU_SUB_BLOCK_ROWS if xp is not np else SUB_BLOCK_ROWS, z.shape[0])
    out = {
        "gram_pass_s": t_pass,
        "effective_tflops": 2 * n_used * d * d / t_pass / 1e12,
        "gemm_square": square,
        "gemm_tflops": gemm_tflops(xp, sync, square, square, square),
        "gemm_gram_shape": [d, rows, d],
        "gemm_gram_shape_tflops": gemm_tflops(xp, sync, d, rows, d),
    }
    out["fraction_of_gemm"] = out["effective_tflops"] / out["gemm_tflops"]
    return out


def run_dfre(config: dict) -> dict:
    """The dfre side, run in its own process: read the store, compute, report."""
    import dask

    from dfre.metrics.gfre import gfre_matrix

    names, arrays, labels = read_synthetic_zarr(config["path"])
    arrays = [a.rechunk({0: config["chunk_rows"]}) for a in arrays]
    if config.get("decay"):
        arrays = ill_conditioned(arrays, config["decay"], config["seed"])
    selection = _selection(config["selection"], labels, config["seed"])
    del labels
    dask.config.set(scheduler="threads", num_workers=config["threads"])
    out = {"names": names, "rss_before_gb": _peak_rss_gb()}
    if config["device"] == "cuda" or config.get("pass_rate"):
        if config["device"] == "cuda":
            import cupy

            arrays = [a.map_blocks(cupy.asarray, dtype=a.dtype) for a in arrays]
        arrays = dask.persist(*arrays)  # data already in (GPU) memory before timing
        _device(config["device"])[1]()
        out.update(pass_rate(arrays, selection, config))
    start, cpu = time.perf_counter(), time.process_time()
    result = gfre_matrix(arrays, selection, names=names, solver=config["solver"], pointwise=True)
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = time.process_time() - cpu
    out["matrix"] = result.matrix.tolist()
    out["alpha"] = result.alpha.tolist()
    out["solver_used"] = result.config["solver_used"]
    out["exact_path_for"] = result.config["exact_path_for"]
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def dfre_in_subprocess(config: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--run-dfre", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"dfre process failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_pairs(path: str, selection_spec: str, seed: int, n_pairs: int, decay=None):
    """skmatter's GFRE for the first ``n_pairs`` (source, target) pairs, float64 inputs."""
    from skmatter.metrics import global_reconstruction_error

    names, arrays, labels = read_synthetic_zarr(path)
    selection = _selection(selection_spec, labels, seed)
    if decay:
        arrays = ill_conditioned(arrays, decay, seed)
    data = [np.asarray(a, dtype=np.float64) for a in arrays]
    m = len(data)
    # every source in turn, off-diagonal pairs first, so that a few pairs are representative
    pairs = [(a, (a + shift) % m) for shift in (*range(1, m), 0) for a in range(m)][:n_pairs]
    warm = np.arange(min(400, len(labels)))  # imports and first-call costs, not timed
    global_reconstruction_error(data[0][warm], data[1][warm])
    values, times, cpu_times = {}, [], []
    for a, b in pairs:
        start, cpu = time.perf_counter(), time.process_time()
        values[a, b] = global_reconstruction_error(
            data[a], data[b], test_idx=selection.test, train_idx=selection.train
        )
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        print(
            f"  skmatter {names[a]} -> {names[b]}: {values[a, b]:.6f} in {times[-1]:.1f} s "
            f"(CPU {cpu_times[-1]:.1f} s)",
            flush=True,
        )
    return values, times, cpu_times, m * m


def print_matrix(names, matrix) -> None:
    width = max(len(n) for n in names) + 2
    print(" " * width + "".join(n.rjust(width) for n in names))
    for name, row in zip(names, matrix, strict=True):
        print(name.ljust(width) + "".join(f"{v:{width}.4f}" for v in row))


def bench_matrix(args, workdir: str) -> None:
    dims = [int(d) for d in args.dims.split(",")]
    path = os.path.join(workdir, f"synthetic-{args.n_envs}.zarr")
    start = time.perf_counter()
    write_synthetic_zarr(path, args.n_envs, dims, args.seed, chunk_rows=args.chunk_rows)
    out_data = time.perf_counter() - start
    print(
        f"data: {args.n_envs} environments, dims {dims}, written in "
        f"{time.perf_counter() - start:.1f} s to {path}"
    )
    spec = f"stratified:{args.test}"
    config = {
        "path": path,
        "selection": spec,
        "seed": args.seed,
        "solver": args.solver,
        "chunk_rows": args.chunk_rows,
        "threads": args.threads,
        "device": args.device,
        "decay": args.decay,
        "pass_rate": args.pass_rate,
    }
    out = dfre_in_subprocess(config)
    out.update({"n_envs": args.n_envs, "dims": dims, "data_seconds": out_data})
    write_json(args.json, out)
    names = out["names"]
    spectra = f"singular values decaying to {args.decay:g}" if args.decay else "as generated"
    print(
        f"\ndfre ({args.solver}, {args.device}, {args.threads} threads, features {spectra}): "
        f"whole {len(names)}x{len(names)} matrix with pointwise errors in "
        f"{out['seconds']:.2f} s (CPU {out['cpu_seconds']:.1f} s), peak RSS "
        f"{out['peak_rss_gb']:.2f} GB; path: {out['solver_used']}"
        + (f" (exact pass for {', '.join(out['exact_path_for'])})" if out["exact_path_for"] else "")
    )
    if "effective_tflops" in out:
        print(
            f"dfre Gram pass on {args.device}: {out['gram_pass_s']:.3f} s, effective "
            f"{out['effective_tflops']:.2f} TFLOP/s (float64) = "
            f"{out['fraction_of_gemm']:.0%} of the float64 GEMM rate measured here: "
            f"{out['gemm_tflops']:.2f} TFLOP/s ({out['gemm_square']}^3), "
            f"{out['gemm_gram_shape_tflops']:.2f} TFLOP/s (Gram shape "
            f"{'x'.join(map(str, out['gemm_gram_shape']))})"
        )
    print_matrix(names, np.array(out["matrix"]))
    if args.reference_pairs <= 0:
        return
    print(f"\nskmatter 0.4.1 global_reconstruction_error, {args.reference_pairs} pair(s):")
    values, times, cpu_times, n_all = reference_pairs(
        path, spec, args.seed, args.reference_pairs, args.decay
    )
    per_pair = float(np.mean(times))
    total = sum(times) if len(times) == n_all else per_pair * n_all
    label = "measured" if len(times) == n_all else f"extrapolated from {len(times)} pairs"
    matrix = np.array(out["matrix"])
    rel = [abs(matrix[a, b] / v - 1) for (a, b), v in values.items() if a != b]
    print(f"skmatter: {per_pair:.2f} s per pair; {n_all}-pair total {total:.1f} s ({label})")
    if rel:
        print(f"max relative difference dfre vs skmatter (off-diagonal pairs run): {max(rel):.2e}")
    print(
        f"speed-up dfre vs skmatter for the whole matrix: {total / out['seconds']:.1f}x "
        f"wall time ({label} reference)"
    )
    cpu_total = float(np.mean(cpu_times)) * n_all
    print(
        f"CPU time (robust to other load on the machine): dfre {out['cpu_seconds']:.1f} s, "
        f"skmatter {cpu_total:.1f} s ({label}): {cpu_total / out['cpu_seconds']:.1f}x"
    )


def write_json(path: str | None, figures: dict) -> None:
    """Write ``figures`` to ``path`` (if given) as JSON."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


def _written(path: str, n: int, dims: list[int], seed: int) -> bool:
    """Whether ``path`` already holds this synthetic data set (complete: attrs come last)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
    return (attrs.get("n"), attrs.get("dims"), attrs.get("seed")) == (n, list(dims), seed)


def bench_out_of_core(args, workdir: str) -> None:
    n = args.out_of_core
    path = os.path.join(workdir, f"ooc-{n}.zarr")
    dims = [512, 144]
    size = n * sum(dims) * 4 / 1e9
    if _written(path, n, dims, args.seed):
        print(f"data: {n} environments x {dims} float32 = {size:.2f} GB, reused from {path}")
    else:
        start = time.perf_counter()
        write_synthetic_zarr(path, n, dims, args.seed, chunk_rows=args.chunk_rows)
        print(
            f"data: {n} environments x {dims} float32 = {size:.2f} GB on disk, written in "
            f"{time.perf_counter() - start:.1f} s to {path}"
        )
    config = {
        "path": path,
        "selection": "random:1000",
        "seed": args.seed,
        "solver": args.solver,
        "chunk_rows": args.chunk_rows,
        "threads": args.threads,
        "device": args.device,
    }
    out = dfre_in_subprocess(config)
    chunk_gb = args.chunk_rows * sum(dims) * 4 / 1e9
    print(
        f"dfre ({args.solver}): 2x2 matrix over {n} environments in {out['seconds']:.1f} s "
        f"(CPU {out['cpu_seconds']:.1f} s) "
        f"({n / out['seconds']:.3g} rows/s, {size / out['seconds']:.2f} GB/s); peak RSS "
        f"{out['peak_rss_gb']:.2f} GB for {size:.1f} GB of data (chunk {chunk_gb:.3f} GB)"
    )
    print_matrix(out["names"], np.array(out["matrix"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-envs", type=int, default=258_000)
    p.add_argument("--dims", default=",".join(map(str, PAPER_DIMS)))
    p.add_argument("--test", type=int, default=1000, help="stratified test environments")
    p.add_argument(
        "--reference-pairs",
        type=int,
        default=16,
        help="skmatter pairs to run (0: none); the total is extrapolated",
    )
    p.add_argument("--solver", choices=("auto", "gram", "tsqr"), default="auto")
    p.add_argument(
        "--decay",
        type=float,
        help="make the features ill-conditioned: singular values spread down to this factor",
    )
    p.add_argument("--chunk-rows", type=int, default=1 << 15)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out-of-core",
        type=int,
        metavar="N",
        help="6b: stream N x (512, 144) features to disk and run on them",
    )
    p.add_argument("--workdir", help="where the Zarr data go (default: a temporary folder)")
    p.add_argument(
        "--pass-rate",
        action="store_true",
        help="measure the Gram pass on in-memory rows against the GEMM rate (always on cuda)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (JSON)")
    p.add_argument("--run-dfre", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_dfre:
        print(json.dumps(run_dfre(json.loads(args.run_dfre))))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = args.workdir if args.workdir and args.out_of_core else tmp
        if args.out_of_core:
            bench_out_of_core(args, workdir)
        else:
            bench_matrix(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
