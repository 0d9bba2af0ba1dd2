"""The dfre store: one Zarr v3 group holding structures, features, descriptors and results.

Layout (see ``DESIGN.md``)::

    <store>/                       attrs: dfre_schema_version, created, n_structures, n_atoms,
                                          provenance (one record per ingested source)
      structures/
        numbers    int16   (n_atoms,)
        positions  float64 (n_atoms, 3)
        offsets    int64   (n_structures + 1,)  atoms of structure s: offsets[s]:offsets[s+1]
        cell       float64 (n_structures, 3, 3)
        pbc        bool    (n_structures, 3)
        info/<key> float64 or str (n_structures,)
      features/<model>/<layer>  float32 (n_atoms, d)
      descriptors/<name>        float64 (n_structures, D)
      results/<run>/            arrays and attrs of one analysis run

Rows of every per-atom array are the same atoms in the same order, so the feature
sets of different models line up row by row.

Appending is crash-safe: the arrays are written first and the counts in the group
attributes are updated last, so the attributes are the commit point. Readers only
look at rows below the committed counts; rows written by an interrupted append are
invisible and overwritten by the next one.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import zarr

from dfre.defaults import CHUNK_ATOMS
from dfre.errors import DfreError, did_you_mean
from dfre.names import RUN_NAME, check_run_name  # noqa: F401 (part of this API)

SCHEMA_VERSION = 1
DEFAULT_CHUNK_ATOMS = CHUNK_ATOMS
DEFAULT_CHUNK_STRUCTURES = 1 << 14
RESULT_CHUNK = 1 << 16  # test environments per chunk of a result's per-environment arrays

#: Label used for structures whose info has no subset key.
UNLABELLED = "unlabelled"


#: What a results name may hold: one level below ``results/``, never a path.
def _is_url(path: str) -> bool:
    return "://" in path


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class StructureBlock:
    """A batch of structures in store layout, ready to be appended.

    ``counts[s]`` atoms of structure ``s`` occupy consecutive rows of ``numbers`` and
    ``positions``. ``info`` maps a key to one value per structure (``float`` or
    ``str``; ``None`` where a structure has no value).
    """

    numbers: np.ndarray
    positions: np.ndarray
    counts: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    info: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def n_structures(self) -> int:
        return len(self.counts)

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @classmethod
    def from_atoms(cls, frames: Sequence[Any], info: dict[str, list[Any]] | None = None):
        """Build a block from ASE ``Atoms``; ``info`` gives per-structure values."""
        counts = np.array([len(a) for a in frames], dtype=np.int64)
        numbers = (
            np.concatenate([a.numbers for a in frames]).astype(np.int16)
            if frames
            else np.zeros(0, np.int16)
        )
        positions = (
            np.concatenate([a.positions for a in frames]).astype(np.float64)
            if frames
            else np.zeros((0, 3))
        )
        cell = np.array([np.asarray(a.cell[:], dtype=np.float64) for a in frames]).reshape(-1, 3, 3)
        pbc = np.array([np.asarray(a.pbc, dtype=bool) for a in frames]).reshape(-1, 3)
        return cls(numbers, positions, counts, cell, pbc, dict(info or {}))

    @classmethod
    def concatenate(cls, blocks: Sequence[StructureBlock]) -> StructureBlock:
        """One block holding ``blocks`` in order (info keys missing in a block are None)."""
        if len(blocks) == 1:
            return blocks[0]
        keys = sorted({k for b in blocks for k in b.info})
        info = {
            k: [v for b in blocks for v in b.info.get(k, [None] * b.n_structures)] for k in keys
        }
        return cls(
            np.concatenate([b.numbers for b in blocks]),
            np.concatenate([b.positions for b in blocks]),
            np.concatenate([b.counts for b in blocks]),
            np.concatenate([b.cell for b in blocks]),
            np.concatenate([b.pbc for b in blocks]),
            info,
        )


class Store:
    """A dfre store opened from a local path or any fsspec URL that zarr accepts."""

    def __init__(self, group: zarr.Group, path: str, *, writable: bool):
        self.group = group
        self.path = path
        self.writable = writable
        self._offsets: np.ndarray | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        chunk_atoms: int = DEFAULT_CHUNK_ATOMS,
        chunk_structures: int = DEFAULT_CHUNK_STRUCTURES,
    ) -> Store:
        """Create an empty store at ``path``; refuse to overwrite anything there."""
        path = os.fspath(path)
        if not _is_url(path) and os.path.exists(path):
            if os.path.isfile(path):
                raise DfreError(
                    f"store path {path} is a file, not a Zarr store: give a directory path"
                )
            if not _is_empty_dir(path):
                raise DfreError(
                    f"cannot create a store at {path}: the directory is not empty; "
                    "choose a new path or remove it"
                )
        if chunk_atoms < 1 or chunk_structures < 1:
            raise DfreError("chunk sizes must be positive integers")
        # a folder holding only bookkeeping files (the write lock) is taken as it is
        mode = "a" if not _is_url(path) and _is_empty_dir(path) else "w-"
        group = zarr.open_group(store=path, mode=mode, zarr_format=3)
        s = group.create_group("structures")
        s.create_array("numbers", shape=(0,), chunks=(chunk_atoms,), dtype="int16")
        s.create_array("positions", shape=(0, 3), chunks=(chunk_atoms, 3), dtype="float64")
        offsets = s.create_array(
            "offsets", shape=(1,), chunks=(chunk_structures,), dtype="int64", fill_value=0
        )
        offsets[:] = 0
        s.create_array("cell", shape=(0, 3, 3), chunks=(chunk_structures, 3, 3), dtype="float64")
        s.create_array("pbc", shape=(0, 3), chunks=(chunk_structures, 3), dtype="bool")
        s.create_group("info")
        for name in ("features", "descriptors", "results"):
            group.create_group(name)
        group.update_attributes(
            {
                "dfre_schema_version": SCHEMA_VERSION,
                "created": _now(),
                "n_structures": 0,
                "n_atoms": 0,
                "chunk_atoms": chunk_atoms,
                "chunk_structures": chunk_structures,
                "provenance": [],
            }
        )
        return cls(group, path, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> Store:
        """Open an existing store read-only (``mode="r"``) or for appending (``"r+"``)."""
        path = os.fspath(path)
        if not _is_url(path):
            if os.path.isfile(path):
                raise DfreError(
                    f"store path {path} is a file, not a Zarr store: give the store directory"
                )
            if not os.path.isdir(path):
                raise DfreError(
                    f"no dfre store at {path}: create one with `dfre ingest FILES --store {path}` "
                    f"or `dfre sample --store {path}`"
                )
        try:
            group = zarr.open_group(store=path, mode="r" if mode == "r" else "r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as error:
            raise DfreError(
                f"{path} is not a Zarr v3 store ({type(error).__name__}): "
                "point --store at a store made by dfre"
            ) from None
        version = group.attrs.get("dfre_schema_version")
        if version is None:
            raise DfreError(f"{path} is a Zarr store but not a dfre store (no dfre_schema_version)")
        if version != SCHEMA_VERSION:
            raise DfreError(
                f"store {path} has dfre schema version {version}, this dfre reads version "
                f"{SCHEMA_VERSION}: re-ingest the data with this version of dfre"
            )
        return cls(group, path, writable=mode != "r")

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, **create_kwargs) -> Store:
        """Open the store at ``path`` for appending, creating it if nothing is there."""
        path = os.fspath(path)
        if not _is_url(path) and (not os.path.exists(path) or _is_empty_dir(path)):
            return cls.create(path, **create_kwargs)
        if _is_url(path):
            try:
                return cls.open(path, mode="r+")
            except DfreError:
                return cls.create(path, **create_kwargs)
        return cls.open(path, mode="r+")

    def __repr__(self) -> str:
        return f"Store({self.path!r}, {self.n_structures} structures, {self.n_atoms} atoms)"

    # ------------------------------------------------------------------ sizes
    @property
    def n_structures(self) -> int:
        return int(self.group.attrs["n_structures"])

    @property
    def n_atoms(self) -> int:
        return int(self.group.attrs["n_atoms"])

    @property
    def chunk_atoms(self) -> int:
        return int(self.group.attrs.get("chunk_atoms", DEFAULT_CHUNK_ATOMS))

    @property
    def provenance(self) -> list[dict]:
        return list(self.group.attrs.get("provenance", []))

    # ------------------------------------------------------------------ structures
    @property
    def structures(self) -> zarr.Group:
        return self.group["structures"]

    @property
    def offsets(self) -> np.ndarray:
        """Row offsets of the structures, shape ``(n_structures + 1,)``."""
        if self._offsets is None or len(self._offsets) != self.n_structures + 1:
            self._offsets = np.asarray(self.structures["offsets"][: self.n_structures + 1])
        return self._offsets

    @property
    def counts(self) -> np.ndarray:
        """Number of atoms of each structure."""
        return np.diff(self.offsets)

    def structure_index(self) -> np.ndarray:
        """For every atom row, the index of its structure, shape ``(n_atoms,)``."""
        return np.repeat(np.arange(self.n_structures, dtype=np.int64), self.counts)

    def numbers(self) -> np.ndarray:
        return np.asarray(self.structures["numbers"][: self.n_atoms])

    def positions(self) -> da.Array:
        """Positions of all atoms as a lazy dask array."""
        return da.from_zarr(self.structures["positions"])[: self.n_atoms]

    def cells(self) -> np.ndarray:
        return np.asarray(self.structures["cell"][: self.n_structures])

    def pbcs(self) -> np.ndarray:
        return np.asarray(self.structures["pbc"][: self.n_structures])

    def info_keys(self) -> list[str]:
        return sorted(self.structures["info"].array_keys())

    def info(self, key: str) -> np.ndarray:
        """Per-structure values of ``key`` (NaN or "" where a structure has none)."""
        if key not in self.info_keys():
            raise DfreError(
                f"store {self.path} has no structure info '{key}'; "
                f"available: {', '.join(self.info_keys()) or 'none'}"
            )
        return np.asarray(self.structures["info"][key][: self.n_structures])

    def subsets(self) -> np.ndarray:
        """Subset label of every structure (``"unlabelled"`` where none was given)."""
        if "subset" not in self.info_keys():
            return np.full(self.n_structures, UNLABELLED, dtype=object)
        labels = self.info("subset").astype(object)
        labels[labels == ""] = UNLABELLED
        return labels

    def atoms(self, index: int):
        """Structure ``index`` as an ``ase.Atoms`` with its info."""
        return next(self.iter_atoms([index]))

    def iter_atoms(self, indices: Iterable[int] | None = None, *, batch: int = 1024) -> Iterator:
        """Yield structures as ``ase.Atoms`` with their info, in the order of ``indices``.

        Indices are read ``batch`` at a time: when their rows lie close together (as
        for consecutive structures) one slice of each array serves the whole batch,
        otherwise each structure's rows are read on their own.
        """
        indices = range(self.n_structures) if indices is None else indices
        window: list[int] = []
        for i in indices:
            i = int(i)
            if not 0 <= i < self.n_structures:
                raise IndexError(f"structure {i} out of range 0..{self.n_structures - 1}")
            window.append(i)
            if len(window) == batch:
                yield from self._atoms_batch(window)
                window = []
        if window:
            yield from self._atoms_batch(window)

    def _atoms_batch(self, indices: list[int]) -> Iterator:
        import ase

        s = self.structures
        offsets = self.offsets
        info_arrays = {k: s["info"][k] for k in self.info_keys()}
        idx = np.asarray(indices, dtype=np.int64)
        s_lo, s_hi = int(idx.min()), int(idx.max()) + 1
        a_lo, a_hi = int(offsets[s_lo]), int(offsets[s_hi])
        wanted = int((offsets[idx + 1] - offsets[idx]).sum())
        if a_hi - a_lo <= max(4 * wanted, 2 * self.chunk_atoms):
            # rows close together: one slice of every array
            structures = np.arange(s_lo, s_hi)
            numbers = np.asarray(s["numbers"][a_lo:a_hi])
            positions = np.asarray(s["positions"][a_lo:a_hi])
            cells, pbcs = np.asarray(s["cell"][s_lo:s_hi]), np.asarray(s["pbc"][s_lo:s_hi])
            info = {k: np.asarray(a[s_lo:s_hi]) for k, a in info_arrays.items()}
        else:
            # scattered: orthogonal selections decode each touched chunk once
            structures = np.unique(idx)
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in structures])
            numbers = np.asarray(s["numbers"].oindex[rows])
            positions = np.asarray(s["positions"].oindex[rows, :])
            cells, pbcs = (
                np.asarray(s["cell"].oindex[structures]),
                np.asarray(s["pbc"].oindex[structures]),
            )
            info = {k: np.asarray(a.oindex[structures]) for k, a in info_arrays.items()}
        counts = offsets[structures + 1] - offsets[structures]
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i in indices:
            j = int(np.searchsorted(structures, i))
            lo, hi = int(starts[j]), int(starts[j + 1])
            atoms = ase.Atoms(
                numbers=numbers[lo:hi].astype(int),
                positions=positions[lo:hi],
                cell=cells[j],
                pbc=pbcs[j],
            )
            for k, column in info.items():
                value = np.asarray(column[j]).item()
                if value == "" or (isinstance(value, float) and np.isnan(value)):
                    continue
                atoms.info[k] = value
            yield atoms

    # ------------------------------------------------------------------ appending
    def _require_writable(self) -> None:
        if not self.writable:
            raise DfreError(f"store {self.path} is open read-only")

    def append(
        self, block: StructureBlock, provenance: dict | Sequence[dict] | None = None
    ) -> None:
        """Append ``block``; commit counts (and optional provenance records) last.

        A provenance record with the same ``"source"`` as an existing one replaces it,
        so an ingest can record its progress through a file batch by batch.
        """
        self._require_writable()
        _validate_block(block)
        derived = self.feature_names() + self.descriptor_names()
        if derived:
            raise DfreError(
                f"store {self.path} already has features or descriptors ({', '.join(derived)}) "
                "of its structures: appending structures would leave them misaligned; "
                "add the structures to a new store"
            )
        columns = self._info_columns(block)  # may refuse the block: before any write
        s = self.structures
        n_s, n_a = self.n_structures, self.n_atoms
        new_s, new_a = n_s + block.n_structures, n_a + block.n_atoms

        s["numbers"].resize((new_a,))
        s["numbers"][n_a:new_a] = block.numbers
        s["positions"].resize((new_a, 3))
        s["positions"][n_a:new_a] = block.positions
        s["cell"].resize((new_s, 3, 3))
        s["cell"][n_s:new_s] = block.cell
        s["pbc"].resize((new_s, 3))
        s["pbc"][n_s:new_s] = block.pbc
        s["offsets"].resize((new_s + 1,))
        s["offsets"][n_s + 1 : new_s + 1] = n_a + np.cumsum(block.counts)
        self._append_info(columns, n_s, new_s)

        attrs = {"n_structures": new_s, "n_atoms": new_a}
        if provenance is not None:
            attrs["provenance"] = self._merged_provenance(provenance)
        self.commit(attrs)

    def update_provenance(self, records: dict | Sequence[dict]) -> None:
        """Commit provenance records alone (same-``source`` records are replaced)."""
        self.commit({"provenance": self._merged_provenance(records)})

    def _merged_provenance(self, records: dict | Sequence[dict]) -> list[dict]:
        records = [records] if isinstance(records, dict) else list(records)
        sources = {r.get("source") for r in records}
        return [r for r in self.provenance if r.get("source") not in sources] + records

    def commit(self, attrs: dict) -> None:
        """Update the store's attributes in one metadata write: the commit point.

        (``group.attrs.update`` would write once per key, so a crash in between could
        leave counts and provenance disagreeing.)
        """
        self._require_writable()
        self.group.update_attributes(attrs)
        self._offsets = None

    def _info_columns(self, block: StructureBlock) -> dict[str, np.ndarray]:
        """Per-key columns of ``block`` in the dtype of the store's info arrays.

        A key is float64 if its values are numbers, text otherwise; a key new to the
        store whose values in this block are all missing waits for a block with values.
        """
        info = self.structures["info"]
        existing = {k: info[k].dtype.kind in "fc" for k in info.array_keys()}
        columns = {}
        for key in sorted(set(existing) | set(block.info)):
            values = block.info.get(key, [None] * block.n_structures)
            if key in existing:
                numeric = existing[key]
            elif all(v is None for v in values):
                continue
            else:
                numeric = not any(isinstance(v, str) for v in values)
            if numeric:
                columns[key] = np.array(
                    [np.nan if v is None else _as_float(v, key) for v in values], dtype="float64"
                )
            else:
                columns[key] = np.array(["" if v is None else str(v) for v in values], dtype=object)
        return columns

    def _append_info(self, columns: dict[str, np.ndarray], n_s: int, new_s: int) -> None:
        info = self.structures["info"]
        existing = set(info.array_keys())
        for key, column in columns.items():
            if key not in existing:
                numeric = column.dtype.kind == "f"
                fill = np.nan if numeric else ""
                arr = info.create_array(
                    key,
                    shape=(n_s,),
                    chunks=(self.structures["cell"].chunks[0],),
                    dtype="float64" if numeric else str,
                    fill_value=fill,
                )
                if n_s:
                    arr[:] = np.full(n_s, fill, dtype="float64" if numeric else object)
            arr = info[key]
            arr.resize((new_s,))
            if len(column):
                arr[n_s:new_s] = column

    # ------------------------------------------------------------------ features
    def feature_names(self) -> list[str]:
        """Names ``model/layer`` of every feature set in the store."""
        names = []
        for model, group in sorted(self.group["features"].groups()):
            layers = sorted(k for k in group.array_keys() if not k.startswith("_"))
            names.extend(f"{model}/{layer}" for layer in layers)
        return names

    def feature_mask(self, name: str) -> np.ndarray:
        """Rows that the model of feature set ``name`` could not handle (True = masked).

        A model group may hold a boolean array ``_mask`` (n_atoms,) written by
        featurize; names starting with ``_`` are bookkeeping, not feature sets.
        """
        self.feature_array(name)
        model = name.partition("/")[0]
        group = self.group["features"][model]
        if "_mask" in group.array_keys():
            mask = group["_mask"]
            if mask.shape != (self.n_atoms,):
                raise DfreError(
                    f"mask features/{model}/_mask in {self.path} has {mask.shape[0]} rows but "
                    f"the store has {self.n_atoms} atoms: remove features/{model} and featurize "
                    "again"
                )
            return np.asarray(mask[...], dtype=bool)
        return np.zeros(self.n_atoms, dtype=bool)

    def valid_rows(self, names: Sequence[str]) -> np.ndarray:
        """Boolean (n_atoms,): rows that every feature set in ``names`` has features for."""
        valid = np.ones(self.n_atoms, dtype=bool)
        for name in names:
            valid &= ~self.feature_mask(name)
        return valid

    def _feature_array_unchecked(self, name: str) -> zarr.Array:
        try:
            array = self.group["features"][name]
        except KeyError:
            array = None
        if not isinstance(array, zarr.Array) or name.rpartition("/")[2].startswith("_"):
            names = self.feature_names()
            raise DfreError(
                f"store {self.path} has no feature set '{name}'{did_you_mean(name, names)}; "
                f"available: {', '.join(names) or 'none'}"
            )
        return array

    def feature_rows_problem(self, name: str) -> str | None:
        """Why the rows of feature set ``name`` are not the store's atoms (None if they are)."""
        array = self._feature_array_unchecked(name)
        if array.ndim != 2:
            return f"has {array.ndim} dimensions, not 2 (rows x features)"
        if array.shape[0] != self.n_atoms:
            return f"has {array.shape[0]} rows but the store has {self.n_atoms} atoms"
        return None

    def feature_array(self, name: str) -> zarr.Array:
        """The Zarr array of feature set ``name`` (``model/layer``), one row per atom.

        An array whose rows are not the store's atoms (another length) is refused with
        a one-line error: its rows cannot be matched to the structures.
        """
        array = self._feature_array_unchecked(name)
        problem = self.feature_rows_problem(name)
        if problem is not None:
            raise DfreError(
                f"feature set {name} in {self.path} {problem}: it does not belong to these "
                f"structures; remove features/{name.partition('/')[0]} and featurize again"
            )
        return array

    def features(self, name: str) -> da.Array:
        """Feature set ``name`` as a lazy dask array of shape ``(n_atoms, d)``."""
        return da.from_zarr(self.feature_array(name))

    def create_feature(
        self,
        name: str,
        dim: int,
        *,
        dtype: str = "float32",
        chunk_atoms: int | None = None,
        attrs: dict | None = None,
    ) -> zarr.Array:
        """Create (or return, if it exists with the same shape) feature set ``name``."""
        self._require_writable()
        model, _, layer = name.partition("/")
        if not model or not layer or "/" in layer:
            raise DfreError(f"feature set name '{name}' must look like MODEL/LAYER")
        group = self.group["features"].require_group(model)
        if layer in group.array_keys():
            arr = group[layer]
            if arr.shape != (self.n_atoms, dim):
                raise DfreError(
                    f"feature set {name} in {self.path} has shape {arr.shape}, expected "
                    f"{(self.n_atoms, dim)}: remove it or use another model name"
                )
            return arr
        chunk = chunk_atoms or self.chunk_atoms
        arr = group.create_array(
            layer, shape=(self.n_atoms, dim), chunks=(chunk, dim), dtype=dtype, fill_value=np.nan
        )
        arr.update_attributes({"created": _now(), **(attrs or {})})
        return arr

    # ------------------------------------------------------------------ descriptors, results
    def descriptor_names(self) -> list[str]:
        return sorted(self.group["descriptors"].array_keys())

    def write_descriptor(self, name: str, values: np.ndarray, attrs: dict | None = None):
        """Write a structure-level descriptor (one row per structure), replacing any old one."""
        self._require_writable()
        values = np.asarray(values)
        if values.shape[0] != self.n_structures:
            raise DfreError(
                f"descriptor {name} has {values.shape[0]} rows, the store has "
                f"{self.n_structures} structures"
            )
        group = self.group["descriptors"]
        arr = group.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=values.shape, overwrite=True
        )
        arr[...] = values
        arr.update_attributes({"created": _now(), **(attrs or {})})
        return arr

    def descriptor_array(self, name: str) -> zarr.Array:
        """The Zarr array of descriptor ``name``, one row per structure (checked)."""
        names = self.descriptor_names()
        if name not in names:
            raise DfreError(
                f"store {self.path} has no descriptor '{name}'{did_you_mean(name, names)}; "
                f"available: {', '.join(names) or 'none'}"
            )
        array = self.group["descriptors"][name]
        if array.shape[0] != self.n_structures:
            raise DfreError(
                f"descriptor {name} in {self.path} has {array.shape[0]} rows but the store has "
                f"{self.n_structures} structures: make it again with `dfre cumulants`"
            )
        return array

    def descriptor(self, name: str) -> np.ndarray:
        return np.asarray(self.descriptor_array(name)[...])

    def result_names(self, *, incomplete: bool = False) -> list[str]:
        """Names of the results (with ``incomplete``, also those whose writer stopped)."""
        return sorted(
            name
            for name, group in self.group["results"].groups()
            if incomplete or group.attrs.get("complete") is not False
        )

    def result(self, run: str) -> zarr.Group:
        check_run_name(run)
        names = self.result_names(incomplete=True)
        if run not in names:
            raise DfreError(
                f"store {self.path} has no results '{run}'{did_you_mean(run, names)}; "
                f"available: {', '.join(names) or 'none'}"
            )
        group = self.group["results"][run]
        if group.attrs.get("complete") is False:
            raise DfreError(
                f"results/{run} of {self.path} is incomplete (the run writing it stopped "
                "before the end): run that command again"
            )
        return group

    def create_result(self, run: str, attrs: dict | None = None) -> zarr.Group:
        """A fresh ``results/<run>`` group (an older one of that name is replaced).

        dfre's writers pass ``{"complete": False}`` in ``attrs`` and call
        :meth:`finish_result` after their last write, so that a run stopped while
        writing (full disk, lost mount) leaves no result that reads as whole: readers
        refuse it and :meth:`result_names` leaves it out.
        """
        self._require_writable()
        check_run_name(run)
        group = self.group["results"].create_group(run, overwrite=True)
        group.update_attributes({"created": _now(), **(attrs or {})})
        return group

    @staticmethod
    def finish_result(group: zarr.Group) -> None:
        """Mark a result group made by :meth:`create_result` complete (its commit point)."""
        group.update_attributes({"complete": True})

    def write_run(
        self,
        run: str,
        kind: str,
        result: Any,
        arrays: dict[str, np.ndarray],
    ) -> zarr.Group:
        """Write one metric run into ``results/<run>`` (the results contract).

        Attributes come from ``result`` (``names``, ``selection``, ``config``); ``arrays``
        are stored chunked along their last axis (the test environments), and the
        selection, when it can save itself, into the subgroup ``selection``.
        """
        from dfre import __version__

        selection = result.selection
        attrs = {
            "kind": kind,
            "names": list(result.names),
            "selection": getattr(selection, "spec", "explicit"),
            "config": result.config,
            "dfre_version": __version__,
            "complete": False,
        }
        group = self.create_result(run, attrs)
        for key, values in arrays.items():
            values = np.asarray(values)
            last = (max(1, min(values.shape[-1], RESULT_CHUNK)),) if values.ndim else ()
            arr = group.create_array(
                key, shape=values.shape, dtype=values.dtype, chunks=values.shape[:-1] + last
            )
            arr[...] = values
        if hasattr(selection, "save"):
            selection.save(group.create_group("selection"))
        self.finish_result(group)
        return group

    # ------------------------------------------------------------------ summary
    def feature_completeness(self, name: str) -> float:
        """Share of the rows of feature set ``name`` written so far (0..1).

        From featurize's done-chunk record ``_done_<layer>`` when there is one, else the
        share of chunks ever written (feature arrays start as unwritten NaN chunks).
        """
        arr = self.feature_array(name)
        model, _, layer = name.partition("/")
        group = self.group["features"][model]
        if f"_done_{layer}" in group.array_keys():
            record = group[f"_done_{layer}"]
            n_chunks = -(-self.n_atoms // arr.chunks[0])
            if record.shape != (n_chunks,):
                raise DfreError(
                    f"done record features/{model}/_done_{layer} in {self.path} has "
                    f"{record.shape[0]} entries for {n_chunks} chunks: remove features/{model} "
                    "and featurize again"
                )
            done = np.asarray(record[...], dtype=bool)
            return float(done.mean()) if done.size else 1.0
        return float(arr.nchunks_initialized / arr.nchunks) if arr.nchunks else 1.0

    def summary(self) -> dict:
        """Everything ``dfre info`` shows, as plain JSON-ready values."""
        from ase.data import chemical_symbols

        numbers = self.numbers()
        z_counts = np.bincount(numbers.astype(np.int64), minlength=1) if len(numbers) else []
        elements = {chemical_symbols[z]: int(c) for z, c in enumerate(z_counts) if c}
        labels = self.subsets().astype(str)
        names, inverse = np.unique(labels, return_inverse=True)
        subsets = {
            str(n): {
                "structures": int((inverse == i).sum()),
                "atoms": int(self.counts[inverse == i].sum()),
            }
            for i, n in enumerate(names)
        }
        info = {}
        for key in self.info_keys():
            values = self.info(key)
            numeric = values.dtype.kind in "fc"
            missing = np.isnan(values) if numeric else values.astype(object) == ""
            info[key] = {"type": "number" if numeric else "text", "missing": int(missing.sum())}
        features = []
        for name in self.feature_names():
            arr = self._feature_array_unchecked(name)
            problem = self.feature_rows_problem(name)
            entry = {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype)}
            if problem is None:
                try:
                    masked = int(self.feature_mask(name).sum())
                    entry["complete"] = round(self.feature_completeness(name), 6)
                except DfreError as error:  # the mask or done record does not fit
                    problem, masked = str(error), 0
                entry["masked_rows"] = masked
            entry["problem"] = problem
            features.append(entry)
        descriptors = []
        for n in self.descriptor_names():
            shape = list(self.group["descriptors"][n].shape)
            problem = None
            if shape[0] != self.n_structures:
                problem = f"has {shape[0]} rows but the store has {self.n_structures} structures"
            descriptors.append({"name": n, "shape": shape, "problem": problem})
        results = []
        for run in self.result_names(incomplete=True):
            attrs = self.group["results"][run].attrs
            results.append(
                {
                    "run": run,
                    "kind": attrs.get("kind"),
                    "names": list(attrs.get("names", [])),
                    "selection": attrs.get("selection"),
                    "complete": attrs.get("complete", True) is not False,
                }
            )
        return {
            "path": self.path,
            "schema_version": int(self.group.attrs["dfre_schema_version"]),
            "created": self.group.attrs.get("created"),
            "n_structures": self.n_structures,
            "n_atoms": self.n_atoms,
            "elements": elements,
            "subsets": subsets,
            "info": info,
            "features": features,
            "descriptors": descriptors,
            "results": results,
            "provenance": self.provenance,
        }


#: Files a command may put into a store directory before the store exists.
_BOOKKEEPING_FILES = {".dfre.lock"}


def _is_empty_dir(path: str) -> bool:
    """A directory holding nothing but bookkeeping files (e.g. the write lock)."""
    return os.path.isdir(path) and not set(os.listdir(path)) - _BOOKKEEPING_FILES


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"):
        if n_bytes < 1000 or unit == "YB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def require_free_space(path: str | os.PathLike, needed: float, what: str) -> None:
    """A one-line DfreError, before any work, when writing about ``needed`` bytes of
    ``what`` into the (local) store at ``path`` cannot fit on its file system."""
    path = os.path.abspath(os.fspath(path))
    if _is_url(path):
        return
    folder = path
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DfreError(
            f"{what} needs about {_size(needed)} in {path} but its file system has "
            f"{_size(free)} free: ask for less, or use a store on a larger file system"
        )


def _as_float(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DfreError(f"info '{key}' mixes numbers and text ({value!r})") from None


def _validate_block(block: StructureBlock) -> None:
    if block.counts.sum() != block.n_atoms:
        raise ValueError("StructureBlock counts do not add up to the number of atoms")
    if block.positions.shape != (block.n_atoms, 3):
        raise ValueError("StructureBlock positions must have shape (n_atoms, 3)")
    if block.cell.shape != (block.n_structures, 3, 3) or block.pbc.shape != (
        block.n_structures,
        3,
    ):
        raise ValueError("StructureBlock cell/pbc must have one entry per structure")
    for key, values in block.info.items():
        if len(values) != block.n_structures:
            raise ValueError(f"StructureBlock info '{key}' needs one value per structure")
