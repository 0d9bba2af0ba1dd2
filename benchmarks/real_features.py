"""GFRE/LFRE on the real features of the shipped models: what the numbers rest on.

Three measurements on the sample dataset featurized with pretrained CHGNet 0.3.0 and
SevenNet-0 (backbone and last layer):

1. ``noise``: CHGNet 0.3.0 evaluated in float32 (as always) and in float64; the
   spectral norm of the difference of the features, against the largest singular value
   and against the storage noise floor ``u ||X||_F`` of ``dfre.linalg.spectrum``;
2. ``seeds``: GFRE over ``--seeds`` random test selections, skmatter's protocol (the
   default) against the noise-aware ``alpha_floor="auto"`` and a fixed floor: the mean
   over seeds, the seed-to-seed standard deviation and the mean bootstrap error bar
   (``dfre.metrics.uncertainty``), and the largest deviation of the default from
   skmatter itself;
3. ``lfre``: the same seed study for LFRE (fewer seeds, it is slower).

    python benchmarks/real_features.py --atoms 2500 --seeds 10 --test 500

The store is written to ``--workdir`` (reused when it is already there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

NAMES = ["chgnet-0.3.0/ll", "chgnet-0.3.0/bb", "sevennet-0/ll", "sevennet-0/bb"]
SHORT = ["C-ll", "C-bb", "S-ll", "S-bb"]


def make_store(path: str, atoms: int):
    import dask

    from dfre.data.sample import write_sample
    from dfre.featurize import featurize
    from dfre.store import Store

    if os.path.exists(path):
        store = Store.open(path)
        if set(NAMES) <= set(store.feature_names()):
            print(f"store: {store.n_atoms} atoms, {store.n_structures} structures, reused {path}")
            return store
    start = time.perf_counter()
    store = write_sample(path, atoms, seed=0)
    with dask.config.set(scheduler="synchronous"):
        for model in ("chgnet-0.3.0", "sevennet-0"):
            featurize(store, model, layers=["bb", "ll"])
    print(
        f"store: {store.n_atoms} atoms, {store.n_structures} structures, featurized in "
        f"{time.perf_counter() - start:.0f} s: {path}"
    )
    return Store.open(path)


def noise(store, n_structures: int) -> None:
    """float32 against float64 forward passes of CHGNet 0.3.0."""
    import torch

    from dfre.linalg.spectrum import unit_roundoff
    from dfre.models import load_extractor

    extractor = load_extractor("chgnet-0.3.0")
    frames = list(store.iter_atoms(range(min(n_structures, store.n_structures))))
    hooks = extractor._hook_modules

    def run(graphs):
        captured, out = {}, {"bb": [], "ll": []}
        handles = [
            hooks[layer].register_forward_pre_hook(
                lambda _m, i, layer=layer: captured.__setitem__(layer, i[0])
            )
            for layer in out
        ]
        with torch.no_grad():
            for lo in range(0, len(graphs), 8):
                extractor.model(graphs[lo : lo + 8], task="e")
                for layer in out:
                    out[layer].append(captured[layer].double().numpy())
        for handle in handles:
            handle.remove()
        return {layer: np.concatenate(v) for layer, v in out.items()}

    single = run([extractor.graph(a) for a in frames])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        extractor.model.double()
        extractor.model.composition_model = None  # an energy offset; features do not use it
        graphs = []
        for a in frames:
            g = extractor.graph(a)
            for key, value in vars(g).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    setattr(g, key, value.double())
            graphs.append(g)
        double = run(graphs)
    finally:
        torch.set_default_dtype(default)
    print(f"\n1. CHGNet 0.3.0 in float32 vs float64, {sum(len(a) for a in frames)} atoms:")
    for layer in ("bb", "ll"):
        x32, x64 = single[layer], double[layer]
        s64 = np.linalg.svd(x64 - x64.mean(0), compute_uv=False)
        s32 = np.linalg.svd(x32 - x32.mean(0), compute_uv=False)
        diff = x32 - x64
        e = np.linalg.svd(diff - diff.mean(0), compute_uv=False)[0]
        floor = unit_roundoff(np.float32) * np.linalg.norm(x32)
        print(
            f"  {layer}: ||X32 - X64||_2 = {e / s64[0]:.2e} s_max = {e / floor:.1f} x the "
            f"storage floor u||X||_F ({floor / s64[0]:.2e} s_max); smallest s/s_max "
            f"float64 {s64[-1] / s64[0]:.1e}, float32 {s32[-1] / s32[0]:.1e}; "
            f"directions below the float32 difference: {int(np.sum(s64 < e))} of {len(s64)}"
        )


def _table(title: str, names, values: dict) -> None:
    print(f"\n{title}")
    width = 26
    print("pair".ljust(12) + "".join(label.rjust(width) for label in values))
    m = len(names)
    for a in range(m):
        for b in range(m):
            if a == b:
                continue
            cells = []
            for mean, spread, bar in values.values():
                cells.append(f"{mean[a, b]:.4f} ±{spread[a, b]:.4f} ({bar[a, b]:.4f})")
            print(f"{names[a]}->{names[b]}".ljust(12) + "".join(c.rjust(width) for c in cells))


def seed_study(store, metric: str, seeds: int, n_test: int, floors, check: bool) -> None:
    from skmatter.metrics import global_reconstruction_error as sk_gfre

    from dfre.data.selection import selection_for_store
    from dfre.metrics import gfre_matrix, lfre_matrix

    valid = store.valid_rows(NAMES)
    sets = {name: store.features(name).compute() for name in NAMES}
    compute = gfre_matrix if metric == "gfre" else lfre_matrix
    runs = {floor: [] for floor in floors}
    worst, seconds = 0.0, {floor: 0.0 for floor in floors}
    for seed in range(seeds):
        selection = selection_for_store(f"random:{n_test}", store, seed=seed, valid=valid)
        for floor in floors:
            start = time.perf_counter()
            result = compute(sets, selection, alpha_floor=None if floor == "none" else floor)
            seconds[floor] += time.perf_counter() - start
            runs[floor].append(result)
        if check and metric == "gfre":
            values = [np.asarray(v, dtype=np.float64) for v in sets.values()]
            default = runs[floors[0]][-1].matrix
            for a, x in enumerate(values):
                for b, y in enumerate(values):
                    ref = sk_gfre(x, y, train_idx=selection.train, test_idx=selection.test)
                    worst = max(worst, abs(default[a, b] - ref) / max(abs(ref), 1e-1))
    table = {}
    for floor in floors:
        stack = np.array([r.matrix for r in runs[floor]])
        bars = np.array([r.error for r in runs[floor]])
        label = {"none": "skmatter grid"}.get(floor, f"floor {floor}")
        table[label] = (stack.mean(0), stack.std(0, ddof=1), bars.mean(0))
    _table(
        f"{metric.upper()} over {seeds} random:{n_test} selections: mean ±seed-to-seed std "
        "(mean bootstrap error bar)",
        SHORT,
        table,
    )
    for floor in floors:
        print(f"  {floor}: {seconds[floor] / seeds:.1f} s per matrix")
    first = runs[floors[0]][0]
    print("  solver path of the default:", first.config.get("solver_used", "local ridge"))
    for name, info in first.config["diagnostics"]["feature_sets"].items():
        print(f"  {name}: rank {info['rank']}/{info['dim']}, noise floor {info['noise_floor']:.1e}")
    if check and metric == "gfre":
        print(f"  largest deviation of the default from skmatter: {worst:.1e} (relative)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=2500)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--lfre-seeds", type=int, default=3)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--noise-structures", type=int, default=60)
    p.add_argument("--floors", nargs="+", default=["none", "auto", "1e-6"])
    p.add_argument("--no-skmatter", action="store_true", help="skip the skmatter check")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dfre-real"))
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    store = make_store(os.path.join(args.workdir, f"real-{args.atoms}.zarr"), args.atoms)
    noise(store, args.noise_structures)
    floors = [f if f in ("none", "auto") else float(f) for f in args.floors]
    seed_study(store, "gfre", args.seeds, args.test, floors, not args.no_skmatter)
    if args.lfre_seeds:
        seed_study(store, "lfre", args.lfre_seeds, args.test, floors, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
