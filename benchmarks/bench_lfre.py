"""LFRE benchmark: dfre's exact kNN + batched local ridge against skmatter, pair by pair.

7a (default, the paper's protocol): ``--n-envs`` synthetic environments with feature dims
144/512/240/128 (``synthetic.py``), ``--test`` stratified test environments, all other
environments train, k = min(d_F, d_F') per pair, all 16 pairs. dfre computes the whole
matrix; skmatter's ``pointwise_local_reconstruction_error`` (its per-point Python loop)
runs on ``--reference-points`` of the test points for the first ``--reference-pairs``
pairs. With ``--reference-points`` equal to ``--test`` skmatter's time is measured over
every test point; with fewer it is EXTRAPOLATED (fixed cost + n_test x time per point,
from calls on P/2 and P points), and for pairs not run from the mean of those run; dfre's
values on the same test points are checked against skmatter's. Full size, measured
(about 20 min of skmatter):

    python benchmarks/bench_lfre.py --n-envs 258000 --test 1000 \\
        --reference-points 1000 --reference-pairs 16

7b (``--full-dataset``, GPU): every environment a query once (k-fold selection), one
pair given by ``--pairs``; e.g. 1,000,000 environments, 512 -> 128, k = 128, 2 folds:

    python benchmarks/bench_lfre.py --full-dataset --folds 2 --n-envs 1000000 \\
        --dims 512 128 --k 128 --pairs 0-1 --device cuda --reference-points 0

kNN throughput is queries per second (one query = the k nearest train rows of one test
environment in one source space); local-ridge throughput is neighbourhood solves per
second (one solve = one source→target pair at one test environment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import PAPER_DIMS, synthetic_features  # noqa: E402


def parse_pairs(text: str | None, m: int) -> list[tuple[int, int]]:
    if not text:
        return [(i, j) for i in range(m) for j in range(m)]
    return [tuple(int(v) for v in item.split("-")) for item in text.split(",")]


def skmatter_reference(x, y, k, train, test, points):
    """skmatter on the first ``points`` test rows: values and its time for all test rows.

    With ``points`` = every test row the one call is the measured time. Otherwise the
    calls on the first ``points // 4`` and on the first ``points`` rows give the time per
    point (distance row, argsort, local fit) as their difference and the fixed cost
    (scaler fits) as the rest, and the time for all test rows is EXTRAPOLATED from them
    (the fixed cost is about a second at 258,000 rows: give 100 points or more, so that
    the difference is well above the scatter of that cost).
    Returns ``(values, seconds for all test rows, seconds per point, measured)``.
    """
    from skmatter.metrics import pointwise_local_reconstruction_error

    x64, y64 = x.astype(np.float64), y.astype(np.float64)

    def timed(n: int):
        started = time.perf_counter()
        values = pointwise_local_reconstruction_error(
            x64, y64, k, train_idx=train, test_idx=test[:n]
        )
        return values, time.perf_counter() - started

    if points >= len(test):
        values, seconds = timed(len(test))
        return values, seconds, seconds / len(test), True
    _, quarter = timed(points // 4)
    values, full = timed(points)
    per_point = max(full - quarter, 0.0) / (points - points // 4)
    fixed = max(full - points * per_point, 0.0)
    return values, fixed + len(test) * per_point, per_point, False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-envs", type=int, default=258000)
    p.add_argument("--test", type=int, default=1000, help="stratified test environments")
    p.add_argument("--dims", type=int, nargs="+", default=list(PAPER_DIMS))
    p.add_argument("--k", type=int, default=None, help="default min(d_F, d_F') per pair")
    p.add_argument("--pairs", help="source-target index pairs, e.g. 0-1,2-3 (default all)")
    p.add_argument("--full-dataset", action="store_true", help="k-fold: every env a query")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--reference-points", type=int, default=20)
    p.add_argument("--reference-pairs", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Dask threads (default: the CPU count; 2 with --device cuda)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (JSON)")
    args = p.parse_args(argv)

    import dask

    from dfre.data.selection import make_selection
    from dfre.metrics.lfre import k_matrix, lfre_matrix

    if args.threads is None:
        args.threads = 2 if args.device == "cuda" else os.cpu_count()
    dask.config.set(scheduler="threads", num_workers=args.threads)
    started = time.perf_counter()
    features, labels = synthetic_features(args.n_envs, args.dims, args.seed)
    seconds = time.perf_counter() - started
    print(f"data: {args.n_envs} environments, dims {args.dims} ({seconds:.1f} s)")
    if args.full_dataset:
        selection = make_selection(f"kfold:{args.folds}", args.n_envs, seed=args.seed)
    else:
        selection = make_selection(
            f"stratified:{args.test}", args.n_envs, labels=labels, seed=args.seed
        )
    pairs = parse_pairs(args.pairs, len(args.dims))
    kmat = k_matrix(args.dims, args.k)
    n_test = sum(len(te) for _, te in selection.folds)
    print(
        f"selection {selection.spec}: {n_test} test environments, {len(pairs)} pairs, "
        f"device {args.device}, {args.threads} threads"
    )

    if args.device == "cuda":
        import cupy

        features = [cupy.asarray(f) for f in features]
        cupy.cuda.Device().synchronize()
    started = time.perf_counter()
    result = lfre_matrix(features, selection, args.k, pairs=pairs, device=args.device)
    dfre_seconds = time.perf_counter() - started
    t = result.timings
    figures = {
        "n_envs": args.n_envs,
        "dims": args.dims,
        "k": args.k,
        "pairs": pairs,
        "n_test": n_test,
        "device": args.device,
        "seconds": dfre_seconds,
        **t,
        "knn_queries_per_s": t["knn_queries"] / max(t["knn_seconds"], 1e-9),
        "ridge_neighbourhoods_per_s": t["ridge_solves"] / max(t["ridge_seconds"], 1e-9),
        "matrix": result.matrix.tolist(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    print(f"\ndfre: {dfre_seconds:.1f} s for {len(pairs)} pairs x {n_test} test environments")
    print(
        f"  kNN:         {t['knn_seconds']:.1f} s, {t['knn_queries']:.0f} queries, "
        f"{t['knn_queries'] / max(t['knn_seconds'], 1e-9):,.0f} queries/s"
    )
    print(
        f"  local ridge: {t['ridge_seconds']:.1f} s, {t['ridge_solves']:.0f} neighbourhoods, "
        f"{t['ridge_solves'] / max(t['ridge_seconds'], 1e-9):,.0f} neighbourhoods/s "
        f"({t['exact_neighbourhoods']} of {t['ridge_neighbourhoods']} source "
        "neighbourhoods needed the exact SVD path)"
    )
    names = [f"{d}" for d in args.dims]
    print("  LFRE matrix (rows: source dim, columns: target dim; NaN = not computed):")
    for name, row in zip(names, result.matrix, strict=True):
        print(f"    {name:>5} " + " ".join(f"{v:8.4f}" for v in row))
    if args.device == "cuda":
        features = [f.get() for f in features]

    if args.reference_points <= 0:
        return 0
    train, test = selection.folds[0]
    points = min(args.reference_points, len(test))
    per_pair, deviations, all_measured = [], [], True
    how = "every test point" if points == len(test) else f"{points} of the {len(test)} test points"
    print(f"\nskmatter (per-point loop) on {how} of fold 1, per pair:")
    for i, j in pairs[: args.reference_pairs]:
        values, seconds, per_point, measured = skmatter_reference(
            features[i], features[j], int(kmat[i, j]), train, test, points
        )
        all_measured &= measured
        per_pair.append(seconds * len(selection.folds))  # one skmatter call per fold
        ours = result.pointwise[i, j, :points]
        deviation = np.max(np.abs(ours - values) / np.maximum(np.abs(values), 1e-12))
        deviations.append(deviation)
        label = "measured" if measured else "EXTRAPOLATED"
        print(
            f"  {args.dims[i]:>4} -> {args.dims[j]:<4} k={kmat[i, j]:<4} "
            f"{per_point * 1e3:7.1f} ms/point, pair total {per_pair[-1]:7.1f} s ({label}), "
            f"max rel. deviation {deviation:.1e}",
            flush=True,
        )
    counted = len(per_pair)
    total = sum(per_pair) * len(pairs) / counted
    label = "measured" if all_measured and counted == len(pairs) else "EXTRAPOLATED"
    if counted < len(pairs):
        label += f" from {counted} of {len(pairs)} pairs"
    print(f"\nskmatter total for {len(pairs)} pairs x {n_test} points ({label}): {total:.0f} s")
    print(f"dfre total (measured, same run): {dfre_seconds:.1f} s")
    print(
        f"speed-up: {total / dfre_seconds:.1f}x; worst relative deviation from skmatter "
        f"{max(deviations):.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
