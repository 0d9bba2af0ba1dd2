"""Ingest: stream structure files that ASE reads into a dfre store.

Frames are read one at a time (``ase.io.iread``; ASE databases through ``ase.db`` so
that their key-value pairs survive) and appended in batches of about ``chunk_atoms``
atoms. Each batch is one :meth:`Store.append`, whose final attribute update is the
commit point; the provenance record of the file (path, size, mtime, sha256, format,
frames done, complete flag) is committed with it. Hence:

* an ingest killed half-way leaves a store holding the file's first *committed*
  frames; running the same command again resumes after them, so no structure is
  stored twice;
* a file already ingested completely (same sha256) is skipped with a message;
* bad input (unreadable or malformed file, empty file, unknown format, a structure
  with no atoms, non-finite positions or cell, unknown elements) raises
  :class:`DfreError` naming the file and frame, and the store is rolled back to
  what it was before the call.

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
from dataclasses import dataclass
from numbers import Number
from pathlib import Path

import numpy as np

from dfre.errors import DfreError
from dfre.store import (
    _BOOKKEEPING_FILES,
    DEFAULT_CHUNK_ATOMS,
    Store,
    StructureBlock,
    _is_empty_dir,
)

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


def _check_frames(block: StructureBlock, path: str, first_frame: int) -> None:
    """Refuse structures without atoms, with non-finite positions/cell or unknown Z."""
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
    if problems:
        frame, what = min(problems)
        raise DfreError(f"{path} frame {first_frame + frame} {what}: fix or remove that structure")


# ---------------------------------------------------------------------- ingest
def ingest(
    files: Sequence[str | os.PathLike],
    store: str | os.PathLike | Store,
    *,
    format: str | None = None,
    subset_key: str | None = None,
    chunk_atoms: int = DEFAULT_CHUNK_ATOMS,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[IngestReport]:
    """Append the structures of ``files`` to ``store`` (created if absent).

    ``chunk_atoms`` sets the chunk size of a new store and the batch size of the
    appends (one commit per batch). ``log`` receives one line per file;
    ``progress(path, frames_done, atoms_added)`` is called after every commit. Returns
    one :class:`IngestReport` per file. See the module docstring for resumption and errors.
    """
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
    snapshot = _snapshot(store)
    reports = []
    try:
        for path, fmt in zip(paths, formats, strict=True):
            report = _ingest_file(store, path, fmt, subset_key, chunk_atoms, progress)
            reports.append(report)
            if log is not None:
                log(str(report))
    except KeyboardInterrupt:
        raise  # committed batches stay: the next run resumes after them
    except BaseException:
        _rollback(store, snapshot, remove=created, keep_folder=had_folder)
        raise
    return reports


def _exists(path: str) -> bool:
    if "://" in path or os.path.isfile(path):
        return True
    return os.path.isdir(path) and not _is_empty_dir(path)


def _ingest_file(
    store: Store,
    path: str,
    fmt: str,
    subset_key: str | None,
    batch_atoms: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> IngestReport:
    identity = file_identity(path)
    record = next((r for r in store.provenance if r.get("source") == path), None)
    done_before = [r for r in store.provenance if r.get("complete")]
    same_content = next((r for r in done_before if r.get("sha256") == identity["sha256"]), None)
    if same_content is not None:
        return IngestReport(path, fmt, "skipped", 0, 0, int(same_content["frames_done"]))
    start = 0
    if record is not None:
        if record.get("sha256") != identity["sha256"]:
            state = "complete" if record.get("complete") else "interrupted"
            raise DfreError(
                f"{path} changed since its {state} ingest into {store.path} (sha256 differs): "
                "restore the file, or ingest the new content under another file name"
            )
        start = int(record["frames_done"])
    base = {"source": path, "format": fmt, **identity, "first_structure": store.n_structures}
    if record is not None:
        base["first_structure"] = record.get("first_structure", store.n_structures)
    stem = Path(path).stem
    frames, infos = [], []
    done, added_atoms, batch_count = start, 0, 0
    pending = None  # one frame read ahead, so the last batch knows it is the last

    def commit(last: bool) -> None:
        nonlocal frames, infos, done, added_atoms, batch_count
        block = StructureBlock.from_atoms(frames, _columns(infos))
        _check_frames(block, path, done)
        provenance = {**base, "frames_done": done + len(frames), "complete": last}
        try:
            store.append(block, provenance=provenance)
        except DfreError as error:
            raise DfreError(f"{path} frames {done}..{done + len(frames) - 1}: {error}") from None
        done += len(frames)
        added_atoms += block.n_atoms
        frames, infos, batch_count = [], [], 0
        if progress is not None:
            progress(path, done, added_atoms)

    reader = _frames_checked(path, fmt, start)
    for index, atoms in reader:
        frames.append(atoms)
        infos.append(structure_info(atoms, subset_key, stem) | {"source": path, "frame": index})
        batch_count += len(atoms)
        if batch_count >= batch_atoms:
            pending = next(reader, None)
            commit(last=pending is None)
            if pending is None:
                break
            index, atoms = pending
            frames.append(atoms)
            infos.append(structure_info(atoms, subset_key, stem) | {"source": path, "frame": index})
            batch_count += len(atoms)
    if frames:
        commit(last=True)
    elif done == start and start == 0:
        raise DfreError(f"{path} holds no structures ({fmt}): give a file with structures")
    elif record is not None and not record.get("complete"):
        # interrupted after its last batch but before the complete flag: just mark it
        final = {**base, "frames_done": done, "complete": True}
        others = [r for r in store.provenance if r.get("source") != path]
        store.commit({"provenance": [*others, final]})
    status = "resumed" if start else "ingested"
    return IngestReport(path, fmt, status, done - start, added_atoms, done)


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
