"""Defaults shared by the library and the command line.

This module imports nothing, so that the parser of ``dfre`` (which shows them in its
help) is built without loading numpy, Dask or Zarr.
"""

#: Atoms per forward pass of a model in featurize (whole structures).
BATCH_ATOMS = 2048
#: Atom rows per Zarr chunk of a new store.
CHUNK_ATOMS = 1 << 16
#: Closest two atoms of a structure may be at ingest (Å); closer is refused as an error.
MIN_DISTANCE = 0.1
