"""``dfre ingest``: stream structure files that ASE reads into a store."""

from __future__ import annotations

import argparse
import time

from dfre.cli.options import add_store_argument
from dfre.defaults import CHUNK_ATOMS as DEFAULT_CHUNK_ATOMS
from dfre.defaults import MIN_DISTANCE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="append structure files (extxyz, ASE db, CIF, POSCAR, ...) to a store",
        description="Stream the structures of FILES with ASE into the store, in batches of "
        "about --chunk-atoms atoms, each committed on its own. An interrupted ingest resumes "
        "where it stopped when run again; a file ingested completely before is skipped.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="structure files ASE can read")
    add_store_argument(p, "dfre store (created if absent)")
    p.add_argument("--format", help="ASE format name (default: guessed from each file)")
    p.add_argument(
        "--subset-key",
        metavar="KEY",
        help="info key holding the subset label (default: 'subset' or 'config_type', "
        "else the file name)",
    )
    p.add_argument(
        "--chunk-atoms",
        type=int,
        default=DEFAULT_CHUNK_ATOMS,
        metavar="N",
        help=f"atoms per chunk of a new store and per committed batch "
        f"(default {DEFAULT_CHUNK_ATOMS})",
    )
    p.add_argument(
        "--min-distance",
        type=float,
        default=MIN_DISTANCE,
        metavar="Å",
        help=f"refuse a structure with two atoms closer than this (default {MIN_DISTANCE} Å: "
        "two atoms at the same position; 0 turns the check off)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.data.ingest import ingest
    from dfre.lock import store_lock
    from dfre.store import Store

    with store_lock(args.store, "dfre ingest", create=True):
        ingest(
            args.files,
            args.store,
            format=args.format,
            subset_key=args.subset_key,
            chunk_atoms=args.chunk_atoms,
            log=print,
            progress=_Progress(),
            min_distance=args.min_distance,
        )
    store = Store.open(args.store)
    print(f"{store.path}: {store.n_structures} structures, {store.n_atoms} atoms")
    return 0


class _Progress:
    """Print a progress line to stderr at most every ``every`` seconds."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self.start = self.last = time.monotonic()
        self.path = None

    def __call__(self, path: str, frames_done: int, atoms_added: int) -> None:
        from dfre import progress

        now = time.monotonic()
        if path != self.path:  # rates are per file
            self.path, self.start = path, now
        if now - self.last >= self.every:
            rate = 60 * atoms_added / max(now - self.start, 1e-9)
            progress.say(
                f"{path}: {frames_done} structures committed "
                f"({atoms_added} atoms, {rate / 1e6:.2f} M atoms/min)"
            )
            self.last = now
