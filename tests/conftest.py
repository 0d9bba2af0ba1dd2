"""Shared fixtures.

``sample_store`` is a small store (about 500 atoms, seed 0) of the embedded sample
dataset, made once per test session; treat it as read-only. Tests that write into a
store take ``sample_store_copy``, a fresh copy in their own ``tmp_path``.
"""

import re
import shutil

import pytest

#: A line dfre itself writes to stderr: a timestamped progress line, or a ``dfre:`` line.
DFRE_LINE = re.compile(r"^(\d\d:\d\d:\d\d dfre( demo| run)?: |dfre: )")


def one_error_line(stderr: str) -> str:
    """The single ``dfre: error:`` line of a failed command's stderr; every other line is
    dfre's own (timestamped progress), and there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("dfre: error:")]
    assert len(errors) == 1, stderr
    assert all(DFRE_LINE.match(line) for line in lines), stderr
    return errors[0]


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


#: Feature sets of the shipped models used to prove the metrics on real features.
REAL_FEATURES = ["chgnet-0.3.0/ll", "chgnet-0.3.0/bb", "sevennet-0/ll", "sevennet-0/bb"]


@pytest.fixture(scope="session")
def real_store(tmp_path_factory) -> str:
    """A read-only sample store (about 700 atoms, seed 2) with the backbone and last-layer
    features of the pretrained CHGNet 0.3.0 and SevenNet-0 that ship in their wheels:
    real features, ill-conditioned (CHGNet's last layer reaches s/s_max ~ 1e-11) and
    heavy-tailed. Computed once per test session."""
    import dask

    from dfre.data.sample import write_sample
    from dfre.featurize import featurize

    path = tmp_path_factory.mktemp("real") / "real.zarr"
    store = write_sample(path, 700, seed=2, chunk_atoms=256)
    with dask.config.set(scheduler="synchronous"):
        for model in ("chgnet-0.3.0", "sevennet-0"):
            featurize(store, model, layers=["bb", "ll"])
    return str(path)


@pytest.fixture(scope="session")
def real_features(real_store) -> dict:
    """The real feature sets of ``real_store`` on the rows every model has (float32)."""
    import numpy as np

    from dfre.store import Store

    store = Store.open(real_store)
    valid = store.valid_rows(REAL_FEATURES)
    return {name: np.asarray(store.features(name))[valid] for name in REAL_FEATURES}
