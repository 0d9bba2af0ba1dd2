"""Featurize: per-atom latent features of a model for every structure of a store.

The atom rows of the store are cut into *units* of whole Zarr chunks of the
feature arrays; each unit is one Dask task and the only writer of its chunks, so
two tasks never write into the same Zarr chunk. A small structure straddling a
chunk boundary is computed by both neighbouring units, each writing its own rows
(a large one joins the two chunks into one unit), see :func:`plan_units`. A task

1. reads its structures from the store (the store path travels, not the data),
2. loads the model once per worker process (:func:`dfre.models.load_extractor`
   caches it; weights are never pickled into a task),
3. builds the neighbour graphs, optionally ``prefetch`` threads ahead of the
   forward pass, and runs the model on batches of whole structures of about
   ``batch_atoms`` atoms,
4. writes the rows of every layer and of the mask ``features/<model>/_mask``,
5. and only then marks its chunks done in ``features/<model>/_done_<layer>``
   (one Zarr chunk per flag, so concurrent tasks never share a flag chunk).

A re-run computes only the units with a chunk not marked done (resumable).
Structures the model cannot handle are left NaN, masked (True in ``_mask``) and
reported with the reason; the run continues.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from dfre import progress as _progress
from dfre.defaults import BATCH_ATOMS
from dfre.errors import DfreError
from dfre.lock import writes_store
from dfre.models.base import (
    FeatureExtractor,
    Unsupported,
    get_spec,
    load_extractor,
    set_torch_threads,
)
from dfre.store import Store, require_free_space

DEFAULT_BATCH_ATOMS = BATCH_ATOMS
#: Most structure/reason pairs kept in the attributes of the model group.
MAX_RECORDED_MASKED = 10_000
#: Seconds between checks, while no task finishes, that the workers a run needs are there.
SERVED_CHECK_SECONDS = 10.0


@dataclass(frozen=True)
class Unit:
    """One task: it writes rows ``[row_lo, row_hi)`` (Zarr chunks ``[c_lo, c_hi)``) and
    computes the structures ``[s_lo, s_hi)`` overlapping them, whose rows start at
    ``first_row``."""

    s_lo: int
    s_hi: int
    row_lo: int
    row_hi: int
    c_lo: int
    c_hi: int
    first_row: int

    @property
    def n_atoms(self) -> int:
        return self.row_hi - self.row_lo


@dataclass
class FeaturizeReport:
    """What a featurize run did."""

    model: str
    name: str
    layers: list[str]
    n_units: int
    n_units_computed: int
    n_atoms_computed: int
    seconds: float
    masked: dict[int, str] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)  # corrupted chunks found and recomputed

    @property
    def atoms_per_second(self) -> float:
        return self.n_atoms_computed / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        lines = [
            f"{self.name}: layers {', '.join(self.layers)}; computed {self.n_units_computed} of "
            f"{self.n_units} units ({self.n_atoms_computed} atoms) in {self.seconds:.1f} s "
            f"({self.atoms_per_second:.0f} atoms/s)"
        ]
        if self.repaired:
            lines.append(f"{len(self.repaired)} corrupted or missing chunk(s) recomputed:")
            lines.extend(f"  {problem}" for problem in self.repaired)
        if self.masked:
            lines.append(f"{len(self.masked)} structure(s) masked:")
            for index, reason in sorted(self.masked.items())[:20]:
                lines.append(f"  structure {index}: {reason}")
            if len(self.masked) > 20:
                lines.append(f"  ... and {len(self.masked) - 20} more (attrs 'masked')")
        return "\n".join(lines)


def plan_units(offsets: np.ndarray, chunk_rows: int, max_straddle: float = 0.125) -> list[Unit]:
    """Cut the atom rows of structures ``offsets`` into units of whole Zarr chunks.

    Every chunk boundary ``b = k * chunk_rows`` ends a unit, unless a structure larger
    than ``max_straddle * chunk_rows`` atoms straddles it (then the chunks on both
    sides form one unit). A smaller straddling structure is computed by both units,
    each writing only its own rows, so at most ``max_straddle`` of a unit's work is
    repeated and no two tasks ever write the same chunk.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_atoms = int(offsets[-1])
    n_chunks = -(-n_atoms // chunk_rows)
    edges = [0]
    for k in range(1, n_chunks):
        row = k * chunk_rows
        s = int(np.searchsorted(offsets, row, side="right")) - 1
        if offsets[s] == row or offsets[s + 1] - offsets[s] <= max_straddle * chunk_rows:
            edges.append(k)
    edges.append(n_chunks)
    units = []
    for c_lo, c_hi in zip(edges[:-1], edges[1:], strict=True):
        row_lo, row_hi = c_lo * chunk_rows, min(c_hi * chunk_rows, n_atoms)
        s_lo = int(np.searchsorted(offsets, row_lo, side="right")) - 1
        s_hi = int(np.searchsorted(offsets, row_hi, side="left"))
        units.append(Unit(s_lo, s_hi, row_lo, row_hi, c_lo, c_hi, int(offsets[s_lo])))
    return units


def batches_by_atoms(counts: Sequence[int], batch_atoms: int) -> list[list[int]]:
    """Consecutive groups of structure positions with about ``batch_atoms`` atoms each
    (a group closes once it reaches ``batch_atoms``; a large structure is alone)."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for position, count in enumerate(counts):
        if current and size + count > batch_atoms:
            groups.append(current)
            current, size = [], 0
        current.append(position)
        size += int(count)
    if current:
        groups.append(current)
    return groups


def read_frames(store: Store, s_lo: int, s_hi: int) -> list:
    """Structures ``[s_lo, s_hi)`` as ``ase.Atoms``, read with one slice per array."""
    import ase

    s = store.structures
    offsets = np.asarray(s["offsets"][s_lo : s_hi + 1])  # not all offsets: only this slice
    lo, hi = int(offsets[0]), int(offsets[-1])
    numbers = np.asarray(s["numbers"][lo:hi]).astype(int)
    positions = np.asarray(s["positions"][lo:hi])
    cells = np.asarray(s["cell"][s_lo:s_hi])
    pbcs = np.asarray(s["pbc"][s_lo:s_hi])
    frames = []
    for i in range(s_hi - s_lo):
        a, b = int(offsets[i]) - lo, int(offsets[i + 1]) - lo
        frames.append(
            ase.Atoms(numbers=numbers[a:b], positions=positions[a:b], cell=cells[i], pbc=pbcs[i])
        )
    return frames


def build_graphs(
    extractor: FeatureExtractor, items: Sequence[tuple[int, Any]]
) -> tuple[list[tuple[int, Any]], dict[int, str]]:
    """Graphs of ``(position, atoms)`` items, and the reasons of those that have none."""
    graphs, reasons = [], {}
    for position, atoms in items:
        try:
            graphs.append((position, extractor.graph(atoms)))
        except Unsupported as error:
            reasons[position] = str(error)
    return graphs, reasons


def _build_graphs_in_process(load_args: tuple[str, dict], items) -> tuple[list, dict]:
    """:func:`build_graphs` in a graph-builder process (which loads the model once)."""
    name, options = load_args
    return build_graphs(load_extractor(name, "cpu", **options), items)


_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}


def graph_process_pool(n: int) -> ProcessPoolExecutor:
    """A pool of ``n`` spawned processes that build graphs, one per (Dask worker) process.

    Processes cannot be started from daemonic processes, which Dask worker processes
    are by default: start the workers with ``distributed.worker.daemon: false``.
    """
    import multiprocessing

    if multiprocessing.current_process().daemon:
        raise DfreError(
            "graph-builder processes need non-daemonic Dask workers: set the Dask config "
            "distributed.worker.daemon to false (dfre featurize does so for --graph-processes)"
        )
    if n not in _PROCESS_POOLS:
        _PROCESS_POOLS[n] = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
    return _PROCESS_POOLS[n]


def featurize_frames(
    extractor: FeatureExtractor,
    frames: Sequence[Any],
    layers: Sequence[str],
    *,
    batch_atoms: int = DEFAULT_BATCH_ATOMS,
    prefetch: int = 0,
    graph_processes: int = 0,
    dims: dict[str, int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """Features of ``frames`` in batches, tolerating structures the model cannot handle.

    Returns (layer -> float32 rows of all atoms, NaN for masked structures;
    boolean row mask; structure position -> reason). The graphs of the next batches
    are built while the model runs on the current one: by ``prefetch`` threads, or by
    ``graph_processes`` processes (for GPUs, where graph building on one core cannot
    keep up with the forward pass); ``max(prefetch, 2 * graph_processes)`` batches are
    built ahead. With neither, graphs are built just before each forward pass.
    ``on_batch(n_atoms)`` is called after each batch (and once for the structures
    skipped before any batch), so that progress shows within a task.
    """
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    n_rows = int(starts[-1])
    dims = dims or {layer: extractor.layers[layer].dim for layer in layers}
    out = {layer: np.full((n_rows, dims[layer]), np.nan, np.float32) for layer in layers}
    mask = np.zeros(n_rows, dtype=bool)
    reasons: dict[int, str] = {}
    ok = []
    for position, atoms in enumerate(frames):
        reason = extractor.check(atoms)
        if reason is None:
            ok.append(position)
        else:
            reasons[position] = reason
    groups = [
        [(ok[i], frames[ok[i]]) for i in group]
        for group in batches_by_atoms(counts[ok], batch_atoms)
    ]
    if on_batch is not None and reasons:
        on_batch(int(counts[list(reasons)].sum()))

    threads = None
    if graph_processes > 0:
        pool = graph_process_pool(graph_processes)
        load_args = getattr(extractor, "load_args", None)
        if load_args is None:
            raise DfreError(f"model {extractor.name} was not loaded by load_extractor")

        def submit(items):
            return pool.submit(_build_graphs_in_process, load_args, items)

    elif prefetch > 0:
        threads = ThreadPoolExecutor(prefetch)

        def submit(items):
            return threads.submit(build_graphs, extractor, items)

    else:
        submit = None
    ahead = max(prefetch, 2 * graph_processes)
    pending: deque = deque()
    try:
        for index, group in enumerate(groups):
            if submit is None:
                built, failed = build_graphs(extractor, group)
            else:
                while len(pending) < ahead and index + len(pending) < len(groups):
                    pending.append(submit(groups[index + len(pending)]))
                built, failed = pending.popleft().result()
            reasons.update(failed)
            if on_batch is not None:
                on_batch(sum(len(atoms) for _, atoms in group))
            if not built:
                continue
            result = _forward_or_isolate(extractor, built, layers, reasons)
            rows = np.concatenate(
                [np.arange(starts[p], starts[p + 1]) for p, _ in built if p not in reasons]
                or [np.zeros(0, np.int64)]
            )
            for layer, values in result.items():
                if values.shape != (len(rows), out[layer].shape[1]):
                    raise DfreError(
                        f"model {extractor.name} returned {values.shape} features for layer "
                        f"{layer}, expected {(len(rows), out[layer].shape[1])}"
                    )
                out[layer][rows] = values
    finally:
        for future in pending:
            future.cancel()
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
    for position in reasons:
        mask[starts[position] : starts[position + 1]] = True
    return out, mask, reasons


def _forward_or_isolate(
    extractor: FeatureExtractor,
    built: list[tuple[int, Any]],
    layers: Sequence[str],
    reasons: dict[int, str],
) -> dict[str, np.ndarray]:
    """Forward pass of a batch; if the model fails on it, retry structure by structure
    and mask the ones it fails on (with the error as reason)."""
    try:
        return extractor.run(extractor.collate([g for _, g in built]), layers)
    except Exception:
        if len(built) == 1:
            raise
    parts = []
    for position, graph in built:
        try:
            parts.append(extractor.run(extractor.collate([graph]), layers))
        except Exception as error:  # the model itself cannot run on this structure
            reasons[position] = f"model error: {type(error).__name__}: {error}".splitlines()[0]
    return {
        layer: np.concatenate([p[layer] for p in parts])
        if parts
        else np.zeros((0, extractor.layers[layer].dim or 0), np.float32)
        for layer in layers
    }


def featurize_unit(
    store_path: str,
    model: str,
    name: str,
    layers: Sequence[str],
    unit: Unit,
    *,
    device: str = "cpu",
    options: dict | None = None,
    batch_atoms: int = DEFAULT_BATCH_ATOMS,
    prefetch: int = 0,
    graph_processes: int = 0,
    torch_threads: int | None = None,
    progress_topic: str | None = None,
) -> dict:
    """The Dask task: featurize one write unit and record it done after the write.

    Returns ``{"unit": (c_lo, c_hi), "atoms": n, "masked": {structure: reason}}``. The
    atoms of each batch are reported to ``progress_topic`` (:func:`dfre.progress.report`).
    """
    set_torch_threads(torch_threads)
    extractor = load_extractor(model, device, **(options or {}))
    store = Store.open(store_path, mode="r+")
    group = store.group["features"][name]
    frames = read_frames(store, unit.s_lo, unit.s_hi)
    out, mask, reasons = featurize_frames(
        extractor,
        frames,
        layers,
        batch_atoms=batch_atoms,
        prefetch=prefetch,
        graph_processes=graph_processes,
        dims={layer: group[layer].shape[1] for layer in layers},
        on_batch=functools.partial(_progress.report, progress_topic),
    )
    own = slice(unit.row_lo - unit.first_row, unit.row_hi - unit.first_row)
    group["_mask"][unit.row_lo : unit.row_hi] = mask[own]
    for layer in layers:
        group[layer][unit.row_lo : unit.row_hi] = out[layer][own]
    for layer in layers:  # the commit point of this unit
        group[f"_done_{layer}"][unit.c_lo : unit.c_hi] = True
    return {
        "unit": (unit.c_lo, unit.c_hi),
        "atoms": unit.n_atoms,
        "masked": {unit.s_lo + p: r for p, r in reasons.items()},
    }


def check_request(
    store: Store, model: str, layers: Sequence[str] | None, options: dict | None = None
) -> tuple[FeatureExtractor, list[str]]:
    """Validate a featurize request before any work: the model loads (here, on the CPU),
    it offers ``layers``, the store has structures and some of them use only elements
    the model knows. Returns the extractor and the layers (with known dimensions)."""
    extractor = load_extractor(model, "cpu", **(options or {}))
    layers = extractor.check_layers(list(layers) if layers is not None else None)
    if store.n_structures == 0:
        raise DfreError(
            f"store {store.path} has no structures: add some with `dfre ingest FILES --store "
            f"{store.path}` first"
        )
    _check_elements(store, extractor)
    if any(extractor.layers[layer].dim is None for layer in layers):
        _discover_dims(store, extractor, layers)
    return extractor, layers


def describe_request(
    store_path: str, model: str, layers: Sequence[str] | None, options: dict | None
) -> dict:
    """:func:`check_request` where the model is, as plain data: the layers, their
    dimensions and provenance attributes (runs on a worker when the model lives in
    another environment than the client)."""
    extractor, layers = check_request(Store.open(store_path), model, layers, options)
    return {
        "layers": layers,
        "dims": {layer: extractor.layers[layer].dim for layer in layers},
        "attrs": {layer: extractor.attrs(layer) for layer in layers},
    }


@writes_store("dfre featurize")
def featurize(
    store: Store | str,
    model: str,
    *,
    layers: Sequence[str] | None = None,
    name: str | None = None,
    batch_atoms: int = DEFAULT_BATCH_ATOMS,
    device: str = "cpu",
    options: dict | None = None,
    chunk_atoms: int | None = None,
    prefetch: int = 0,
    graph_processes: int = 0,
    torch_threads: int | None = None,
    resources: dict[str, float] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> FeaturizeReport:
    """Write the per-atom features of ``model`` for every structure of ``store``.

    Parameters
    ----------
    store: a :class:`Store` or its path (opened for appending).
    model: registry name (``dfre models``), e.g. ``chgnet-0.3.0``.
    layers: layers to compute (default: all the model offers), e.g. ``["ll", "bb"]``.
    name: model name in the store (``features/<name>/<layer>``); default ``model``.
    batch_atoms: atoms per forward pass (whole structures; a larger one is alone).
    device: ``cpu`` or ``cuda`` (the device of the workers' models).
    options: passed to the model loader, e.g. ``{"path": "model.pt"}`` for user files.
    chunk_atoms: rows per Zarr chunk of new feature arrays (one chunk = the smallest
        unit of work); default: the store's chunk size. Existing arrays keep theirs.
    prefetch: threads that build neighbour graphs ahead of the forward pass.
    graph_processes: processes per worker that build the graphs ahead of the forward
        pass (for GPU workers; needs non-daemonic workers, see :func:`graph_process_pool`).
    torch_threads: intra-op torch threads per worker (default: torch's choice).
    resources: Dask worker resources every task needs, e.g. ``{"mace": 1}`` to run on
        the workers started in MACE's own environment (``dask worker --resources
        mace=1``); the model is then only loaded there, never in this process.
    progress: called with each finished task's result dict.

    Runs on the active Dask scheduler: the current ``distributed.Client`` if there
    is one (results are collected as tasks finish), else dask's default scheduler.
    """
    name = name or model
    check_settings(
        name,
        batch_atoms,
        torch_threads=torch_threads,
        prefetch=prefetch,
        graph_processes=graph_processes,
    )
    store = store if isinstance(store, Store) else Store.open(store, mode="r+")
    if not store.writable:
        store = Store.open(store.path, mode="r+")
    options = dict(options or {})
    complete = featurize_is_complete(store, model, layers, name=name, options=options)
    if complete:  # decided from the store alone: no model is loaded
        n_units = len(
            plan_units(store.offsets, store.group["features"][name][complete[0]].chunks[0])
        )
        return FeaturizeReport(model, name, complete, n_units, 0, 0, 0.0)
    client = _client_or_error() if resources else _current_client()
    placement = _placement(client, model, resources)
    if client is not None:  # the model is loaded where it runs (its environment), once
        info = client.submit(
            describe_request, store.path, model, layers, options, pure=False, **placement
        ).result()
    else:
        info = describe_request(store.path, model, layers, options)
    layers = info["layers"]

    group = store.group["features"].require_group(name)
    chunk = _feature_chunk_rows(store, group, layers, chunk_atoms)
    for layer in layers:
        attrs = {**info["attrs"][layer], "device": device, "registry_name": model}
        arr = store.create_feature(
            f"{name}/{layer}", info["dims"][layer], chunk_atoms=chunk, attrs=attrs
        )
        old = arr.attrs.get("weights_sha256")
        if old != attrs["weights_sha256"]:
            raise DfreError(
                f"feature set {name}/{layer} in {store.path} was made with other weights "
                f"(sha256 {str(old)[:12]}...): choose another --name or remove it"
            )
        if arr.chunks[0] != chunk:
            raise DfreError(f"feature arrays of {name} in {store.path} have different chunk sizes")
    n_chunks = -(-store.n_atoms // chunk)
    if "_mask" not in group.array_keys():
        group.create_array(
            "_mask", shape=(store.n_atoms,), chunks=(chunk,), dtype="bool", fill_value=False
        )
    for layer in layers:
        if f"_done_{layer}" not in group.array_keys():
            group.create_array(
                f"_done_{layer}", shape=(n_chunks,), chunks=(1,), dtype="bool", fill_value=False
            )
    done, repaired = _done_chunks(store, name, layers)

    units = plan_units(store.offsets, chunk)
    todo = []
    for unit in units:
        unit_layers = [lay for lay in layers if not done[lay][unit.c_lo : unit.c_hi].all()]
        if unit_layers:
            todo.append((unit, unit_layers))

    dims = info["dims"]
    needed = sum(u.n_atoms * sum(4 * dims[lay] for lay in lays) for u, lays in todo)
    require_free_space(store.path, needed, f"features of {name} ({len(todo)} units)")

    start = time.perf_counter()
    # every atom a task computes, straddling structures included
    total = sum(int(store.offsets[u.s_hi] - store.offsets[u.s_lo]) for u, _ in todo)
    label = f"features {name} ({', '.join(layers)})"
    with (
        _progress.phase(label, total=total, unit="atoms") as step,
        _progress.listening(step) as topic,
    ):
        tasks = [
            dask.delayed(featurize_unit, pure=False)(
                store.path,
                model,
                name,
                unit_layers,
                unit,
                device=device,
                options=options,
                batch_atoms=batch_atoms,
                prefetch=prefetch,
                graph_processes=graph_processes,
                torch_threads=torch_threads,
                progress_topic=topic,
                dask_key_name=f"featurize-{name}-{unit.c_lo}-{unit.c_hi}-{time.time_ns()}",
            )
            for unit, unit_layers in todo
        ]
        results = _compute_as_completed(tasks, progress, placement, model)
        step.update(done=total)
    seconds = time.perf_counter() - start
    masked: dict[int, str] = {}
    for result in results:
        masked.update(result["masked"])
    _record_masked(group, masked)
    return FeaturizeReport(
        model=model,
        name=name,
        layers=list(layers),
        n_units=len(units),
        n_units_computed=len(results),
        n_atoms_computed=sum(r["atoms"] for r in results),
        seconds=seconds,
        masked=masked,
        repaired=repaired,
    )


def _done_chunks(
    store: Store, name: str, layers: Sequence[str]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The done record of every layer, with the chunks that cannot be trusted cleared.

    Every chunk of the layers, the mask and the done records is decoded (see
    :mod:`dfre.verify`): a chunk that does not decode, or a done chunk whose file is
    missing, is recomputed by this run. Returns the done flags and the problems found.
    """
    from dfre.verify import check_chunks, missing_done_chunks, readable_values

    base = f"features/{name}"
    paths = [f"{base}/{layer}" for layer in layers] + [f"{base}/_mask"]
    paths += [f"{base}/_done_{layer}" for layer in layers]
    problems = check_chunks(store, paths)
    for layer in layers:
        problems += missing_done_chunks(store, f"{name}/{layer}")
    group = store.group["features"][name]
    done = {
        layer: np.asarray(readable_values(group[f"_done_{layer}"], fill=False), dtype=bool)
        for layer in layers
    }
    for problem in problems:  # chunk c of a layer or the mask, or done flag c: redo unit c
        for layer in layers:
            done[layer][problem.chunk[0]] = False
    return done, [str(problem) for problem in problems]


def featurize_is_complete(
    store: Store,
    model: str,
    layers: Sequence[str] | None = None,
    *,
    name: str | None = None,
    options: dict | None = None,
) -> list[str]:
    """The layers asked for, if the store already holds all of them complete; else ``[]``.

    Decided from the store and the registry alone, without loading the model: every
    layer (default: all the model offers) exists with one row per atom, every chunk is
    recorded done (a done flag that does not decode counts as not done) and has its chunk
    file, and the arrays were made by registry model ``model`` with weights of the same
    sha256 as the weights file here. Feature chunks are not decoded here (that would read
    every feature): ``dfre verify`` finds a chunk that is there but damaged. Models with
    other loader options than a weights file (hooks, fidelities given as options) are
    never taken as complete.
    """
    from dfre.models.base import file_sha256, get_spec
    from dfre.verify import missing_done_chunks, readable_values

    spec = get_spec(model)
    options = dict(options or {})
    path = options.pop("path", None)
    options.pop("trust_checkpoint", None)
    wanted = list(layers) if layers else list(spec.layers)
    name = name or model
    features = store.group["features"]
    if options or not wanted or name not in features.group_keys():
        return []
    try:
        weights = path or (None if spec.needs_file else spec.weights())
    except Exception:  # a package that cannot locate its own weights: let the loader say
        return []
    if not weights or not os.path.isfile(weights):
        return []
    sha = file_sha256(weights)
    group = features[name]
    arrays = set(group.array_keys())
    for layer in wanted:
        if layer not in arrays or f"_done_{layer}" not in arrays:
            return []
        attrs = group[layer].attrs
        if group[layer].shape[0] != store.n_atoms or attrs.get("registry_name") != model:
            return []
        if attrs.get("weights_sha256") != sha:
            return []
        done = np.asarray(readable_values(group[f"_done_{layer}"], fill=False), dtype=bool)
        if len(done) != -(-store.n_atoms // group[layer].chunks[0]) or not done.all():
            return []
        if missing_done_chunks(store, f"{name}/{layer}"):
            return []
    return wanted


def check_settings(
    name: str,
    batch_atoms: int,
    *,
    torch_threads: int | None = None,
    prefetch: int = 0,
    graph_processes: int = 0,
) -> None:
    """One-line errors for a bad model name in the store, batch size or thread and
    process counts (checked by the CLI before a cluster starts)."""
    if batch_atoms < 1:
        raise DfreError(f"--batch-atoms must be a positive number of atoms, got {batch_atoms}")
    if torch_threads is not None and torch_threads < 1:
        raise DfreError(f"--torch-threads must be >= 1, got {torch_threads}")
    if prefetch < 0 or graph_processes < 0:
        raise DfreError(
            f"--prefetch and --graph-processes must be >= 0, got {prefetch} and {graph_processes}"
        )
    if "/" in name or name.startswith("_") or not name:
        raise DfreError(
            f"model name '{name}' in the store must be non-empty, without '/' or a leading '_'"
        )


def default_chunk_rows(n_atoms: int, store_chunk: int) -> int:
    """Rows per chunk of new feature arrays: the store's chunk size, but smaller for
    small stores so that there are about 64 units of work (at least 256 rows, a
    multiple of 256), which the workers share evenly (a model's forward pass costs
    about the same per atom from a few hundred atoms up)."""
    target = -(-n_atoms // 64)
    target = max(256, -(-target // 256) * 256)
    return min(store_chunk, target)


def _feature_chunk_rows(store: Store, group, layers: Sequence[str], chunk_atoms: int | None) -> int:
    existing = [group[k].chunks[0] for k in (*layers, "_mask") if k in group.array_keys()]
    if existing:
        return int(existing[0])
    if chunk_atoms is not None:
        if chunk_atoms < 1:
            raise DfreError(f"chunk size must be a positive number of rows, got {chunk_atoms}")
        return int(chunk_atoms)
    return default_chunk_rows(store.n_atoms, store.chunk_atoms)


def _check_elements(store: Store, extractor: FeatureExtractor) -> None:
    """A DfreError when the model supports no structure of the store (element mismatch)."""
    from ase.data import chemical_symbols

    numbers = store.numbers()
    offsets = store.offsets
    unsupported = ~np.isin(numbers, np.fromiter(extractor.supported_elements, dtype=np.int64))
    cumulative = np.concatenate([[0], np.cumsum(unsupported)])
    bad = cumulative[offsets[1:]] - cumulative[offsets[:-1]] > 0
    if bad.all():
        missing = sorted(set(numbers[unsupported].tolist()))
        raise DfreError(
            f"model {extractor.name} supports none of the structures of {store.path}: elements "
            f"{', '.join(chemical_symbols[z] for z in missing)} are outside its training set; "
            "choose a model trained on these elements"
        )


def _discover_dims(store: Store, extractor: FeatureExtractor, layers: Sequence[str]) -> None:
    """Run the model on the first structure it can handle to learn the layer sizes."""
    for index in range(min(store.n_structures, 100)):
        (atoms,) = read_frames(store, index, index + 1)
        if extractor.unsupported_reason(atoms) is None:
            features = extractor.featurize([atoms], layers)
            for layer in layers:
                old = extractor.layers[layer]
                extractor.layers[layer] = type(old)(layer, features[layer].shape[1], old.definition)
            return
    raise DfreError(
        f"model {extractor.name} cannot handle any of the first 100 structures of {store.path}"
    )


def _current_client():
    """The active ``distributed.Client``, or None (dask's default scheduler)."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _client_or_error():
    client = _current_client()
    if client is None:
        raise DfreError(
            "worker resources need a distributed cluster: connect a Client first "
            "(dfre featurize --scheduler ADDRESS)"
        )
    return client


def _has_package(package: str) -> bool:
    """Whether ``package`` is installed where this runs (on a worker, by ``client.run``)."""
    import importlib.metadata

    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _placement(client, model: str, resources: dict | None) -> dict:
    """Where the tasks of ``model`` may run, as keyword arguments of ``client.compute``.

    With ``resources``: the workers that offer them (a DfreError when none does).
    Without: the workers whose environment has the model's package, so that on a
    cluster mixing environments (main workers, MACE workers, ...) each model runs
    where it is installed; no restriction when every worker has it (or there are no
    workers yet), a DfreError naming the environment to start workers from when none has.
    """
    if resources:
        _require_resources(client, resources)
        return {"resources": resources}
    if client is None:
        return {}
    spec = get_spec(model)
    installed = client.run(_has_package, spec.package)
    able = sorted(address for address, ok in installed.items() if ok)
    if installed and not able:
        if spec.env == "main":
            how = "the main environment: `.venv/bin/dask worker SCHEDULER`"
        else:
            how = (
                f"its environment (make env-{spec.env}): "
                f"`.envs/{spec.env}/bin/dask worker SCHEDULER --resources {spec.env}=1`"
            )
        raise DfreError(
            f"no Dask worker has {spec.package}, which model {model} needs: start workers "
            f"from {how}"
        )
    return {"workers": able} if len(able) < len(installed) else {}


def _require_resources(client, resources: dict) -> None:
    """A DfreError unless some worker offers every resource in ``resources``."""
    if _served(client, {"resources": resources}):
        return
    wanted = " ".join(f"{k}={v:g}" for k, v in resources.items())
    raise DfreError(
        f"no Dask worker offers the resources {wanted}: start workers in the model's "
        f'environment with `dask worker SCHEDULER --resources "{wanted}"`'
    )


def _served(client, placement: dict) -> bool:
    """Whether some worker of the cluster can run tasks placed with ``placement``."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if "resources" in placement:
        return any(
            all(w.get("resources", {}).get(k, 0) >= v for k, v in placement["resources"].items())
            for w in workers.values()
        )
    if "workers" in placement:
        return any(address in workers for address in placement["workers"])
    return True


def _compute_as_completed(
    tasks: list,
    progress: Callable[[dict], None] | None,
    placement: dict | None = None,
    model: str = "",
) -> list[dict]:
    """Compute the unit tasks on the active scheduler, reporting each as it finishes.

    While no task finishes, every :data:`SERVED_CHECK_SECONDS` it checks that the
    workers the tasks are placed on are still there, and stops with a DfreError when
    they have all left (Dask would wait for them forever).
    """
    if not tasks:
        return []
    from distributed import wait

    placement = placement or {}
    client = _client_or_error() if placement else _current_client()
    if client is None:  # dask's default scheduler; each task records itself as done
        results = list(dask.compute(*tasks))
        for result in results:
            if progress:
                progress(result)
        return results
    results = []
    futures = client.compute(tasks, **placement)
    pending = set(futures)
    try:
        while pending:
            try:
                done, pending = wait(
                    pending, timeout=SERVED_CHECK_SECONDS, return_when="FIRST_COMPLETED"
                )
            except TimeoutError:
                if not _served(client, placement):
                    where = placement.get("resources") or placement.get("workers")
                    raise DfreError(
                        f"the Dask workers that run model {model} ({where}) left the cluster "
                        f"with {len(pending)} task(s) to do: start them again and re-run "
                        "(finished chunks are kept)"
                    ) from None
                continue
            for future in done:
                result = future.result()
                results.append(result)
                if progress:
                    progress(result)
    except BaseException:
        client.cancel(futures)
        raise
    return results


def _record_masked(group, masked: dict[int, str]) -> None:
    """Merge the reasons of masked structures into the attrs of the model group."""
    if not masked and "masked" in group.attrs:
        return
    record = dict(group.attrs.get("masked", {}))
    for index, reason in sorted(masked.items()):
        if len(record) >= MAX_RECORDED_MASKED:
            break
        record[str(index)] = reason
    group.attrs["masked"] = record
