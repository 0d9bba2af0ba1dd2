"""Shared fixtures.

``sample_store`` is a small store (about 500 atoms, seed 0) of the embedded sample
dataset, made once per test session; treat it as read-only. Tests that write into a
store take ``sample_store_copy``, a fresh copy in their own ``tmp_path``.
"""

import shutil

import pytest

SAMPLE_ATOMS = 500


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> str:
    """Path of a read-only sample store: 531 atoms in 27 structures, all seven subsets."""
    from dfre.data.sample import write_sample

    path = tmp_path_factory.mktemp("sample") / "sample.zarr"
    write_sample(path, SAMPLE_ATOMS, seed=0, chunk_atoms=128)
    return str(path)


@pytest.fixture
def sample_store_copy(sample_store, tmp_path) -> str:
    """Path of a private, writable copy of ``sample_store``."""
    path = tmp_path / "sample.zarr"
    shutil.copytree(sample_store, path)
    return str(path)
