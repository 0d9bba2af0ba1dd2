"""Data in and out of a store: ingest of ASE-readable files, the embedded sample
dataset, and the selections of train/test environments shared by all metrics."""

from dfre.data.ingest import IngestReport, ingest
from dfre.data.sample import sample_structures, write_sample
from dfre.data.selection import Selection, make_selection, selection_for_store

__all__ = [
    "IngestReport",
    "Selection",
    "ingest",
    "make_selection",
    "sample_structures",
    "selection_for_store",
    "write_sample",
]
