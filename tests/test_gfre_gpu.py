"""The GFRE engine on CuPy chunks (runs only where CuPy sees a GPU)."""

import dask.array as da
import numpy as np
import pytest

from dfre.linalg.backend import gpu_available
from dfre.metrics import gfre_matrix

pytestmark = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


@pytest.mark.parametrize("solver", ["gram", "tsqr"])
def test_cupy_chunks_give_the_numpy_result(solver):
    import cupy

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(3000, 4))
    sets = [
        np.tanh(latent @ rng.normal(size=(4, d))) + 0.1 * rng.normal(size=(3000, d))
        for d in (7, 12)
    ]
    test = np.arange(0, 3000, 10)
    train = np.setdiff1d(np.arange(3000), test)
    expected = gfre_matrix(sets, (train, test), solver=solver, pointwise=True)
    on_gpu = [
        da.from_array(s.astype(np.float32), chunks=(700, -1)).map_blocks(cupy.asarray) for s in sets
    ]
    got = gfre_matrix(on_gpu, (train, test), solver=solver, pointwise=True)
    off = ~np.eye(2, dtype=bool)
    np.testing.assert_allclose(got.matrix[off], expected.matrix[off], rtol=1e-5)
    np.testing.assert_allclose(got.pointwise[0, 1], expected.pointwise[0, 1], rtol=1e-4)
    assert isinstance(got.matrix, np.ndarray)
