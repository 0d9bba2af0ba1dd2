"""Ingest: stream structure files that ASE reads into a dfre store.

Frames are read one at a time (``ase.io.iread``; ASE databases through ``ase.db`` so
that their key-value pairs survive) and appended in batches of about ``chunk_atoms``
atoms; a batch may hold the frames of several small files. Each batch is one
:meth:`Store.append`, whose single attribute write is the commit point; the provenance
records of the files it touches (path, size, mtime, sha256, format, frames done,
complete flag) are committed with it. Hence:

* an ingest killed half-way leaves a store holding the *committed* frames of each
  file; running the same command again resumes after them, so no structure is
  stored twice (a file's structures stay contiguous unless other files are ingested
  between the interruption and the resumption);
* a file already ingested completely (same sha256) is skipped with a message;
* bad input (unreadable or malformed file, empty file, unknown format, a structure
  with no atoms, non-finite positions or cell, unknown elements, two atoms at the
  same position) raises :class:`DfreError` naming the file and frame, and the store
  is rolled back to what it was before the call;
* a failure of the machine (full disk, read-only or lost file system) or an
  interruption keeps the batches committed before it: the batch being written never
  reached its commit (Zarr writes every file under a temporary name and renames it,
  so a failed write leaves the previous file whole), and running the same command
  again continues after the committed batches;
* appending to a store whose structure arrays do not decode is refused (see
  :func:`dfre.verify.require_intact_structures`).

Per-structure info: ``energy`` (the calculator's energy if the file gives one, e.g.
``energy=`` in an extxyz header, else an ``energy`` info key if present), ``subset``
(the ``subset_key`` value; by default the ``subset`` or ``config_type`` key; else the
file's stem), ``source`` (absolute path) and ``frame`` (index in the file), plus every
scalar ``atoms.info`` key (numbers as float64, text as text; keys ``source``/``frame``
of the file itself become ``file_source``/``file_frame``). Per-atom arrays other than
positions and numbers (forces, charges, ...) are not stored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Number
from pathlib import Path

import numpy as np

from dfre.data.overlap import MIN_DISTANCE, first_overlap
from dfre.errors import DfreError
from dfre.lock import writes_store
from dfre.store import (
    _BOOKKEEPING_FILES,
    DEFAULT_CHUNK_ATOMS,
    Store,
    StructureBlock,
    _is_empty_dir,
)
from dfre.verify import require_intact_structures

DB_FORMATS = ("db", "json")
SUBSET_KEYS = ("subset", "config_type")
RESERVED = {"source": "file_source", "frame": "file_frame"}


@dataclass
class IngestReport:
    """What ingest did with one file."""

    path: str
    format: str
    status: str  # "ingested", "resumed" or "skipped"
    frames: int  # frames appended by this call
    atoms: int  # atoms appended by this call
    frames_total: int  # frames of this file now in the store

    def __str__(self) -> str:
        if self.status == "skipped":
            return f"{self.path}: already ingested completely ({self.frames_total} frames), skipped"
        verb = "resumed, added" if self.status == "resumed" else "added"
        return f"{self.path}: {verb} {self.frames} structures, {self.atoms} atoms ({self.format})"


# ---------------------------------------------------------------------- checks
def resolve_format(path: str, format: str | None) -> str:
    """The ASE format name to read ``path`` with (``format`` checked, or guessed)."""
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    if format is not None:
        if format not in ioformats or not ioformats[format].can_read:
            raise DfreError(
                f"unknown format '{format}' for {path}: give an ASE format that can be read "
                "(see `ase info --formats`), e.g. extxyz, db, cif, vasp"
            )
        return format
    try:
        guessed = filetype(path)
    except UnknownFileTypeError as error:
        if "Empty file" in str(error):
            raise DfreError(f"{path} is empty: give a file that holds structures") from None
        raise DfreError(
            f"cannot tell the format of {path} ({error}): give it with --format, "
            "e.g. --format extxyz"
        ) from None
    if guessed not in ioformats or not ioformats[guessed].can_read:
        raise DfreError(f"ASE cannot read {path} (format '{guessed}'): give --format explicitly")
    return guessed


def file_identity(path: str) -> dict:
    """Size, modification time and sha256 of ``path`` (read once, in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest.hexdigest()}


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DfreError(f"input file {path} does not exist")
    if not os.path.isfile(path):
        raise DfreError(f"input {path} is not a file: give structure files")
    if not os.access(path, os.R_OK):
        raise DfreError(f"input file {path} is not readable: check its permissions")
    if os.path.getsize(path) == 0:
        raise DfreError(f"{path} is empty: give a file that holds structures")


# ---------------------------------------------------------------------- reading
def iter_frames(path: str, format: str, start: int = 0) -> Iterator:
    """Structures of ``path`` from frame ``start`` on, one at a time."""
    if format in DB_FORMATS:
        import ase.db

        with ase.db.connect(path, serial=True, type=format) as db:
            for row in db.select(offset=start) if start else db.select():
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                yield atoms
        return
    import ase.io

    yield from ase.io.iread(path, index=slice(start, None), format=format)


def _frames_checked(path: str, format: str, start: int) -> Iterator:
    """``iter_frames`` with every read error turned into a one-line DfreError."""
    frames = iter_frames(path, format, start)
    index = start
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except DfreError:
            raise
        except Exception as error:  # ASE raises many kinds for malformed input
            reason = " ".join(str(error).split()) or type(error).__name__
            if isinstance(error, KeyError):  # e.g. an unknown chemical symbol
                reason = f"unknown element symbol or key {reason}"
            raise DfreError(
                f"cannot read {path} frame {index} as {format}: {reason}; "
                "fix or remove that frame, or give the right --format"
            ) from None
        yield index, atoms
        index += 1


def structure_info(atoms, subset_key: str | None, stem: str) -> dict:
    """The per-structure info of ``atoms`` (see the module docstring)."""
    info = {}
    for key, value in atoms.info.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, str | Number) and not isinstance(value, complex):
            key = str(key).replace("/", "_")
            if key not in ("", ".", "..") and not key.startswith("__"):
                info[RESERVED.get(key, key)] = value
    calc = getattr(atoms, "calc", None)
    energy = getattr(calc, "results", {}).get("energy") if calc is not None else None
    if energy is not None:
        info["energy"] = float(np.asarray(energy).ravel()[0])
    keys = (subset_key,) if subset_key else SUBSET_KEYS
    subset = next((atoms.info[k] for k in keys if k in atoms.info), stem)
    info["subset"] = str(subset)
    return info


def _check_block(
    block: StructureBlock, origins: list[tuple[str, int]], min_distance: float = MIN_DISTANCE
) -> None:
    """Refuse structures without atoms, with non-finite positions/cell, unknown Z or two
    atoms closer than ``min_distance`` Å; ``origins[s]`` is the (file, frame) of structure
    ``s``. Vectorised over the batch."""
    frame_of_atom = np.repeat(np.arange(block.n_structures), block.counts)
    problems = []
    if (block.counts == 0).any():
        problems.append((int(np.argmax(block.counts == 0)), "has no atoms"))
    bad_pos = ~np.isfinite(block.positions).all(axis=1)
    if bad_pos.any():
        problems.append((int(frame_of_atom[np.argmax(bad_pos)]), "has NaN or inf positions"))
    bad_cell = ~np.isfinite(block.cell).all(axis=(1, 2))
    if bad_cell.any():
        problems.append((int(np.argmax(bad_cell)), "has a NaN or inf cell"))
    bad_z = (block.numbers < 1) | (block.numbers > 118)
    if bad_z.any():
        problems.append((int(frame_of_atom[np.argmax(bad_z)]), "has atoms of no element (Z=0)"))
    if not problems:
        overlap = first_overlap(block.positions, block.counts, block.cell, block.pbc, min_distance)
        if overlap is not None:
            path, index = origins[overlap.structure]
            raise DfreError(
                f"{path} frame {index} has atoms {overlap.i} and {overlap.j} at the same position "
                f"({overlap.distance:.3f} Å apart, closer than {min_distance:g} Å): fix or remove "
                "that structure (or lower --min-distance)"
            )
    if problems:
        structure, what = min(problems)
        path, index = origins[structure]
        raise DfreError(f"{path} frame {index} {what}: fix or remove that structure")


def _check_types(info: dict, numeric: dict[str, bool], path: str, index: int) -> None:
    """Every info key keeps one type (number or text) across the store."""
    for key, value in info.items():
        is_number = not isinstance(value, str)
        if numeric.setdefault(key, is_number) != is_number:
            raise DfreError(
                f"{path} frame {index}: info '{key}' mixes numbers and text ({value!r}); "
                "give it one type in every structure"
            )


# ---------------------------------------------------------------------- ingest
@dataclass
class _FileJob:
    """One input file: what to read, and how far reading and committing got."""

    path: str
    format: str
    record: dict  # its provenance record, without progress fields
    start: int  # first frame to read (frames before it are in the store)
    status: str  # "ingested", "resumed" or "skipped"
    frames_read: int = 0
    atoms_read: int = 0
    finished: bool = False  # every frame read

    def provenance(self) -> dict:
        return {
            **self.record,
            "frames_done": self.start + self.frames_read,
            "complete": self.finished,
        }

    def report(self) -> IngestReport:
        total = self.start + self.frames_read
        return IngestReport(
            self.path, self.format, self.status, self.frames_read, self.atoms_read, total
        )


@dataclass
class _Batch:
    """Structures read but not committed yet, possibly from several files."""

    frames: list = field(default_factory=list)
    infos: list = field(default_factory=list)
    origins: list = field(default_factory=list)  # (file, frame) of each structure
    n_atoms: int = 0
    touched: dict = field(default_factory=dict)  # path -> _FileJob with news to commit
    min_distance: float = MIN_DISTANCE

    def commit(self, store: Store, progress) -> None:
        records = [job.provenance() for job in self.touched.values()]
        if self.frames:
            block = StructureBlock.from_atoms(self.frames, _columns(self.infos))
            _check_block(block, self.origins, self.min_distance)
            store.append(block, records)
        elif records:
            store.update_provenance(records)
        if progress is not None:
            for job in self.touched.values():
                progress(job.path, job.start + job.frames_read, job.atoms_read)
        self.frames, self.infos, self.origins, self.n_atoms, self.touched = [], [], [], 0, {}


@writes_store("dfre ingest", create=True)
def ingest(
    files: Sequence[str | os.PathLike],
    store: str | os.PathLike | Store,
    *,
    format: str | None = None,
    subset_key: str | None = None,
    chunk_atoms: int = DEFAULT_CHUNK_ATOMS,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    min_distance: float = MIN_DISTANCE,
) -> list[IngestReport]:
    """Append the structures of ``files`` to ``store`` (created if absent).

    ``chunk_atoms`` sets the chunk size of a new store and the batch size of the
    appends: one commit per about ``chunk_atoms`` atoms, a batch holding the frames of
    as many (small) files as fit. ``log`` receives one line per file at the end;
    ``progress(path, frames_done, atoms_added)`` is called after every commit. Returns
    one :class:`IngestReport` per file. ``min_distance`` (Å) is the closest two atoms of
    a structure may be (0: no check; see :mod:`dfre.data.overlap`). See the module
    docstring for resumption and errors.
    """
    if not min_distance >= 0:
        raise DfreError(f"--min-distance must be >= 0 Å, got {min_distance}")
    if chunk_atoms < 1:
        raise DfreError(f"--chunk-atoms must be a positive number, not {chunk_atoms}")
    paths = [os.path.abspath(os.fspath(f)) for f in files]
    if not paths:
        raise DfreError("no input files given")
    for path in paths:
        _check_file(path)
    formats = [resolve_format(path, format) for path in paths]

    created = not isinstance(store, Store) and not _exists(os.fspath(store))
    had_folder = not isinstance(store, Store) and os.path.isdir(os.fspath(store))
    if not isinstance(store, Store):
        store = Store.open_or_create(store, chunk_atoms=chunk_atoms)
    store._require_writable()
    if store.n_structures:  # appending builds on the last chunks: they must decode
        require_intact_structures(store)
    snapshot = _snapshot(store)
    try:
        jobs = _plan(store, paths, formats)
        _read_all(store, jobs, subset_key, chunk_atoms, progress, min_distance)
    except DfreError:  # bad input: the store goes back to what it was before the call
        _rollback(store, snapshot, remove=created, keep_folder=had_folder)
        raise
    # Anything else (interrupt, full disk, lost mount, ...) keeps the committed batches:
    # the failed batch never reached its commit, and the next run resumes after them.
    reports = [job.report() for job in jobs]
    if log is not None:
        for report in reports:
            log(str(report))
    return reports


def _exists(path: str) -> bool:
    if "://" in path or os.path.isfile(path):
        return True
    return os.path.isdir(path) and not _is_empty_dir(path)


def _plan(store: Store, paths: list[str], formats: list[str]) -> list[_FileJob]:
    """Decide per file: skip (same content complete), resume, or read from the start."""
    by_source = {r.get("source"): r for r in store.provenance}
    complete_by_hash = {
        r["sha256"]: r for r in store.provenance if r.get("complete") and "sha256" in r
    }
    jobs, seen = [], {}
    for path, fmt in zip(paths, formats, strict=True):
        identity = file_identity(path)
        record = {"source": path, "format": fmt, **identity}
        done = complete_by_hash.get(identity["sha256"]) or seen.get(identity["sha256"])
        if done is not None:
            jobs.append(_FileJob(path, fmt, record, int(done.get("frames_done", 0)), "skipped"))
            continue
        previous = by_source.get(path)
        start = 0
        if previous is not None:
            if previous.get("sha256") != identity["sha256"]:
                state = "complete" if previous.get("complete") else "interrupted"
                raise DfreError(
                    f"{path} changed since its {state} ingest into {store.path} (sha256 "
                    "differs): restore the file, or ingest the new content under another name"
                )
            start = int(previous["frames_done"])
        jobs.append(_FileJob(path, fmt, record, start, "resumed" if previous else "ingested"))
        seen[identity["sha256"]] = {"frames_done": start}
    return jobs


def _read_all(
    store: Store, jobs: list[_FileJob], subset_key, batch_atoms: int, progress, min_distance
):
    info_arrays = store.structures["info"]
    numeric = {k: info_arrays[k].dtype.kind in "fc" for k in info_arrays.array_keys()}
    batch = _Batch(min_distance=min_distance)
    for job in jobs:
        if job.status == "skipped":
            continue
        stem = Path(job.path).stem
        for index, atoms in _frames_checked(job.path, job.format, job.start):
            info = structure_info(atoms, subset_key, stem) | {"source": job.path, "frame": index}
            _check_types(info, numeric, job.path, index)
            batch.frames.append(atoms)
            batch.infos.append(info)
            batch.origins.append((job.path, index))
            batch.n_atoms += len(atoms)
            job.frames_read += 1
            job.atoms_read += len(atoms)
            batch.touched[job.path] = job
            if batch.n_atoms >= batch_atoms:
                batch.commit(store, progress)
        if job.start == 0 and job.frames_read == 0:
            raise DfreError(
                f"{job.path} holds no structures ({job.format}): give a file with structures"
            )
        job.finished = True
        batch.touched[job.path] = job  # its completion goes with the next commit
    batch.commit(store, progress)


def _columns(infos: list[dict]) -> dict[str, list]:
    keys = sorted({k for info in infos for k in info})
    return {k: [info.get(k) for info in infos] for k in keys}


# ---------------------------------------------------------------------- rollback
def _snapshot(store: Store) -> dict:
    attrs = store.group.attrs
    return {
        "n_structures": int(attrs["n_structures"]),
        "n_atoms": int(attrs["n_atoms"]),
        "provenance": list(attrs.get("provenance", [])),
        "info_keys": set(store.info_keys()),
    }


def _rollback(store: Store, snapshot: dict, *, remove: bool, keep_folder: bool) -> None:
    """Put ``store`` back as it was at ``snapshot``; with ``remove`` (this call made the
    store) delete it, keeping its folder if ``keep_folder`` (the folder was there)."""
    if remove and "://" not in store.path:
        # remove what this call created; a folder that was there before stays, empty
        for entry in os.scandir(store.path):
            if entry.name in _BOOKKEEPING_FILES:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.remove(entry.path)
        if not keep_folder and not os.listdir(store.path):
            os.rmdir(store.path)
        return
    store.commit({k: snapshot[k] for k in ("n_structures", "n_atoms", "provenance")})
    info = store.structures["info"]
    for key in set(info.array_keys()) - snapshot["info_keys"]:
        del info[key]
    n_s, n_a = snapshot["n_structures"], snapshot["n_atoms"]
    s = store.structures
    for name, shape in [
        ("numbers", (n_a,)),
        ("positions", (n_a, 3)),
        ("cell", (n_s, 3, 3)),
        ("pbc", (n_s, 3)),
        ("offsets", (n_s + 1,)),
    ]:
        s[name].resize(shape)
    for key in snapshot["info_keys"]:
        info[key].resize((n_s,))
