"""Store check: decode every chunk of a store and check that its arrays fit together.

:func:`verify_store` is what ``dfre verify`` runs; it returns one :class:`Problem` per
finding, each naming the array (its path in the store), the chunk index and the
chunk's file:

* a stored chunk that does not decode (garbage, truncated or empty file): read in
  slabs of whole chunks along the first axis, and chunk by chunk where a slab fails;
* arrays whose length does not fit the committed counts: a feature set, mask or
  done-record whose rows are not the store's atoms, a descriptor whose rows are not
  its structures, structure arrays shorter than what is committed, offsets that do
  not run from 0 to the number of atoms;
* chunks that must be stored but are missing (local stores): any chunk of
  ``structures/numbers`` below the committed atoms (a missing one reads as Z = 0), and
  a chunk of a feature set that featurize recorded done whose rows are not all masked
  (a missing one reads as NaN).

What it cannot see: a chunk whose bytes were changed so that it still decodes (dfre's
Zarr chunks carry no checksum). Featurize runs :func:`check_chunks` on its own arrays
to recompute corrupted feature chunks; ingest runs it on the structure arrays and
refuses to append to a corrupted store; the command line runs it after an unexpected
error to name a corrupted chunk instead of printing a traceback.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import zarr

from dfre.errors import DfreError

#: Bytes decoded at once when checking an array (whole chunks along the first axis).
SLAB_BYTES = 1 << 28


@dataclass(frozen=True)
class Problem:
    """One finding of the store check: ``array`` (its path in the store), the ``chunk``
    index and its ``file`` when the finding is about one chunk, and ``what`` is wrong."""

    array: str
    what: str
    chunk: tuple[int, ...] | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = self.array
        if self.chunk is not None:
            index = ",".join(map(str, self.chunk))
            where = f"chunk {index} of {self.array} (file {self.file})"
        return f"{where} {self.what}"


def chunk_file(store, array: zarr.Array, coords: Sequence[int]) -> str:
    """Where chunk ``coords`` of ``array`` lies (a file path, or a URL for remote stores)."""
    key = array.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    return f"{store.path.rstrip('/')}/{array.path}/{key}"


def _error_text(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"does not decode ({text})"


def store_arrays(store) -> list[tuple[str, zarr.Array]]:
    """Every array of the store with its path, in a fixed order."""
    found = []
    with warnings.catch_warnings():  # the write lock and temporary files are not Zarr nodes
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        members = list(store.group.members(max_depth=None))
    for path, member in members:
        if isinstance(member, zarr.Array):
            found.append((path, member))
    return sorted(found, key=lambda item: item[0])


def _chunk_coords(array: zarr.Array, first: range) -> Iterable[tuple[int, ...]]:
    grid = array.cdata_shape
    return itertools.product(first, *(range(n) for n in grid[1:]))


def _decode_chunks(store, path: str, array: zarr.Array, first: range) -> list[Problem]:
    """Decode chunks ``first`` (along axis 0) of ``array`` one by one; name the bad ones."""
    problems = []
    for coords in _chunk_coords(array, first):
        try:
            array.blocks[coords]
        except Exception as error:  # a codec raises many kinds for bad bytes
            problems.append(
                Problem(path, _error_text(error), coords, chunk_file(store, array, coords))
            )
    return problems


def check_array(store, path: str, array: zarr.Array) -> list[Problem]:
    """Decode every chunk of ``array``: slabs of whole chunks, chunk by chunk where a
    slab fails."""
    if array.ndim == 0 or array.size == 0:
        try:
            array[...]
        except Exception as error:
            return [Problem(path, _error_text(error), (0,) * array.ndim, None)]
        return []
    n_first = array.cdata_shape[0]
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    step = max(1, SLAB_BYTES // max(1, row_bytes * array.chunks[0]))
    problems = []
    for lo in range(0, n_first, step):
        hi = min(lo + step, n_first)
        try:
            array[lo * array.chunks[0] : hi * array.chunks[0]]
        except Exception:
            problems += _decode_chunks(store, path, array, range(lo, hi))
    return problems


def check_chunks(
    store,
    paths: Iterable[str] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> list[Problem]:
    """Decode every stored chunk of the arrays ``paths`` of ``store`` (default: all)."""
    if paths is None:
        arrays = store_arrays(store)
    else:
        arrays = []
        for path in paths:
            try:
                node = store.group[path]
            except KeyError:
                continue
            if isinstance(node, zarr.Array):
                arrays.append((path, node))
    problems = []
    for path, array in arrays:
        if progress is not None:
            progress(path)
        problems += check_array(store, path, array)
    return problems


def _is_local(store) -> bool:
    return "://" not in store.path


def _missing_chunks(store, path: str, array: zarr.Array, first: Iterable[int]) -> list[Problem]:
    """Chunks ``first`` (whole chunk rows) of a local ``array`` that have no file."""
    problems = []
    for c in first:
        for coords in _chunk_coords(array, range(c, c + 1)):
            file = chunk_file(store, array, coords)
            if not os.path.exists(file):
                problems.append(Problem(path, "is missing (its file is gone)", coords, file))
    return problems


def check_layout(store) -> list[Problem]:
    """Lengths of the arrays against the committed counts, and chunks that must exist."""
    problems: list[Problem] = []
    n_s, n_a = store.n_structures, store.n_atoms
    s = store.structures
    for name, need in [("numbers", n_a), ("positions", n_a), ("cell", n_s), ("pbc", n_s)]:
        if s[name].shape[0] < need:
            problems.append(
                Problem(
                    f"structures/{name}",
                    f"has {s[name].shape[0]} rows, fewer than the {need} committed",
                )
            )
    for key in store.info_keys():
        if s["info"][key].shape[0] < n_s:
            problems.append(
                Problem(f"structures/info/{key}", f"has fewer rows than the {n_s} structures")
            )
    problems += _check_offsets(store)
    if _is_local(store) and s["numbers"].shape[0] >= n_a and n_a:
        n_chunks = -(-n_a // s["numbers"].chunks[0])
        problems += _missing_chunks(store, "structures/numbers", s["numbers"], range(n_chunks))
    for name in store.feature_names():
        problems += _check_feature_set(store, name)
    for name in store.descriptor_names():
        rows = store.group["descriptors"][name].shape[0]
        if rows != n_s:
            problems.append(
                Problem(f"descriptors/{name}", f"has {rows} rows, the store has {n_s} structures")
            )
    return problems


def _check_offsets(store) -> list[Problem]:
    offsets_array = store.structures["offsets"]
    if offsets_array.shape[0] < store.n_structures + 1:
        return [Problem("structures/offsets", "has fewer entries than structures + 1")]
    try:
        offsets = np.asarray(offsets_array[: store.n_structures + 1])
    except Exception:
        return []  # reported by the chunk check
    if offsets[0] != 0 or offsets[-1] != store.n_atoms or (np.diff(offsets) < 0).any():
        return [
            Problem(
                "structures/offsets",
                f"do not run from 0 to the {store.n_atoms} atoms in non-decreasing order",
            )
        ]
    return []


def _check_feature_set(store, name: str) -> list[Problem]:
    model, _, layer = name.partition("/")
    group = store.group["features"][model]
    array = group[layer]
    path = f"features/{name}"
    n_a = store.n_atoms
    if array.ndim != 2 or array.shape[0] != n_a:
        return [Problem(path, f"has {array.shape[0]} rows, the store has {n_a} atoms")]
    problems = []
    keys = set(group.array_keys())
    if "_mask" in keys and group["_mask"].shape[0] != n_a:
        rows = group["_mask"].shape[0]
        problems.append(
            Problem(f"features/{model}/_mask", f"has {rows} rows, the store has {n_a} atoms")
        )
    done_key = f"_done_{layer}"
    if done_key not in keys:
        return problems
    chunk = array.chunks[0]
    n_chunks = -(-n_a // chunk)
    if group[done_key].shape[0] != n_chunks:
        problems.append(
            Problem(
                f"features/{model}/{done_key}",
                f"has {group[done_key].shape[0]} entries for {n_chunks} chunks of {name}",
            )
        )
        return problems
    if problems:
        return problems
    return missing_done_chunks(store, name)


def missing_done_chunks(store, name: str) -> list[Problem]:
    """Chunks of feature set ``name`` that featurize recorded done but that have no file
    although not all their rows are masked (local stores; they would read as NaN)."""
    if not _is_local(store):
        return []
    model, _, layer = name.partition("/")
    group = store.group["features"][model]
    array = group[layer]
    keys = set(group.array_keys())
    if f"_done_{layer}" not in keys:
        return []
    done = readable_values(group[f"_done_{layer}"], fill=False)
    n_a = store.n_atoms
    mask = readable_values(group["_mask"], fill=False) if "_mask" in keys else np.zeros(n_a, bool)
    chunk = array.chunks[0]
    needed = [
        c for c in range(len(done)) if done[c] and not mask[c * chunk : (c + 1) * chunk].all()
    ]
    return _missing_chunks(store, f"features/{name}", array, needed)


def readable_values(array: zarr.Array, fill) -> np.ndarray:
    """A 1-d ``array`` read whole, ``fill`` in the chunks that do not decode."""
    try:
        return np.asarray(array[...])
    except Exception:
        values = np.full(array.shape, fill, dtype=array.dtype)
        step = array.chunks[0]
        for c in range(array.cdata_shape[0]):
            try:
                values[c * step : (c + 1) * step] = array.blocks[c]
            except Exception:
                continue
        return values


def check_structures(store) -> list[Problem]:
    """The structure arrays: decodable, as long as committed, offsets and numbers sound."""
    problems = [p for p in check_layout(store) if p.array.startswith("structures/")]
    paths = [p for p, _ in store_arrays(store) if p.startswith("structures/")]
    return problems + check_chunks(store, paths)


def require_intact_structures(store) -> None:
    """A one-line DfreError if the structure arrays of ``store`` have a problem (an append
    would build on them)."""
    problems = check_structures(store)
    if problems:
        raise corruption_error(store, problems, lead=f"cannot append to store {store.path}")


def verify_store(store, *, progress: Callable[[str], None] | None = None) -> list[Problem]:
    """Every problem of ``store``: array lengths and missing chunks, then every chunk decoded."""
    return check_layout(store) + check_chunks(store, progress=progress)


# ---------------------------------------------------------------------- messages
def repair_advice(store, problem: Problem) -> str:
    """What to do about ``problem``."""
    parts = problem.array.split("/")
    if parts[0] == "features" and len(parts) >= 3:
        group = store.group["features"][parts[1]]
        model = parts[1]
        for key in group.array_keys():
            if not key.startswith("_"):
                model = group[key].attrs.get("registry_name", model)
                break
        name = f" --name {parts[1]}" if model != parts[1] else ""
        if "has" in problem.what and "rows" in problem.what:
            return (
                f"remove features/{parts[1]} (it does not belong to these structures) and run "
                f"`dfre featurize --store {store.path} --model {model}{name}`"
            )
        return f"run `dfre featurize --store {store.path} --model {model}{name}` to recompute it"
    if parts[0] == "descriptors":
        return "make the descriptor again with `dfre cumulants` (it is replaced)"
    if parts[0] == "results" and len(parts) >= 2:
        return f"run the command that wrote results/{parts[1]} again (it is replaced)"
    return "restore the store from a copy, or ingest the structures into a new store"


def corruption_error(store, problems: Sequence[Problem], *, lead: str | None = None) -> DfreError:
    """One line naming the first problem (and how many more), with what to do."""
    first = problems[0]
    more = ""
    if len(problems) > 1:
        n = len(problems) - 1
        more = (
            f" (and {n} more problem{'s' if n > 1 else ''}: see `dfre verify --store {store.path}`)"
        )
    lead = lead or f"store {store.path}"
    return DfreError(f"{lead}: {first}{more}: {repair_advice(store, first)}")
