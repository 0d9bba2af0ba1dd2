"""The CuPy and dask-cuda paths against the CPU: run by ``benchmarks/gpu_check.sh``.

On a machine where CuPy sees a GPU every test runs on it: GFRE, LFRE, kNN, local ridge
and cumulants on CuPy arrays must equal the numpy results to 1e-10 (relative; 1e-12
absolute for values that are zero up to rounding), computed in this thread under
``cupyx.errstate(linalg="raise")`` (cuSOLVER's convergence flags are checked, not
ignored); featurize on a LocalCUDACluster must equal the CPU features to 1e-5, and a
cluster with an RMM pool must compute LFRE like the CPU.

Without a GPU the module is skipped, except under ``DFRE_GPU_CHECK=dry-run``
(``gpu_check.sh --dry-run``): the same tests then run with numpy "device" arrays and a
LocalCluster of CPU processes, so the check itself cannot rot.
"""

from __future__ import annotations

import contextlib
import os

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dfre import cluster
from dfre.data.selection import make_selection
from dfre.descriptors.cumulants import structure_cumulants
from dfre.featurize import featurize, read_frames
from dfre.linalg.backend import gpu_available, to_numpy
from dfre.linalg.knn import knn
from dfre.linalg.local_ridge import local_ridge
from dfre.metrics import gfre_matrix
from dfre.metrics.lfre import lfre_matrix
from dfre.models.base import load_extractor
from dfre.store import Store, StructureBlock

MODE = "cuda" if gpu_available() else os.environ.get("DFRE_GPU_CHECK")
pytestmark = pytest.mark.skipif(
    MODE not in ("cuda", "dry-run"), reason="needs CuPy and a CUDA GPU (or DFRE_GPU_CHECK=dry-run)"
)
RTOL, ATOL = 1e-10, 1e-12
FEATURE_TOL = 1e-5


def to_device(x: np.ndarray):
    if MODE == "cuda":
        import cupy

        return cupy.asarray(x)
    return x


def device_chunks(x: np.ndarray, rows: int) -> da.Array:
    """``x`` as a dask array of device chunks of ``rows`` rows."""
    return da.from_array(to_device(x), chunks=(rows, -1), asarray=False, name=False)


@pytest.fixture(autouse=True)
def checked_linalg():
    """Tasks in this thread (synchronous scheduler), cuSOLVER failures raised."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(scheduler="synchronous"))
        if MODE == "cuda":
            import cupyx

            stack.enter_context(cupyx.errstate(linalg="raise"))
        yield


def feature_sets(n: int, dims, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    return [
        np.tanh(latent @ rng.normal(size=(4, d))) + 0.05 * rng.normal(size=(n, d)) for d in dims
    ]


@pytest.mark.parametrize("solver", ["gram", "tsqr"])
def test_gfre_on_device_equals_cpu(solver):
    sets = feature_sets(3000, (7, 12, 5))
    test = np.arange(0, 3000, 10)
    selection = (np.setdiff1d(np.arange(3000), test), test)
    expected = gfre_matrix(sets, selection, solver=solver, pointwise=True)
    got = gfre_matrix(
        [device_chunks(s, 700) for s in sets], selection, solver=solver, pointwise=True
    )
    assert type(got.matrix) is np.ndarray and type(got.pointwise) is np.ndarray
    np.testing.assert_allclose(got.matrix, expected.matrix, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.pointwise, expected.pointwise, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got.alpha, expected.alpha)


def test_lfre_on_device_equals_cpu():
    sets = feature_sets(1200, (6, 9))
    selection = make_selection("kfold:2", 1200, seed=0)
    expected = lfre_matrix(sets, selection, k=15, query_block=128)
    got = lfre_matrix(
        [device_chunks(s, 256) for s in sets],
        selection,
        k=15,
        query_block=128,
        device="cuda" if MODE == "cuda" else None,
    )
    assert type(got.pointwise) is np.ndarray
    np.testing.assert_allclose(got.pointwise, expected.pointwise, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.matrix, expected.matrix, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got.alpha, expected.alpha)


@pytest.mark.parametrize("k", [40, 600])
def test_knn_on_device_equals_cpu(k):
    """Several tiles per partition (the candidate lists of later tiles) and k above 512
    (on CuPy the bisection selection instead of a full sort)."""
    rng = np.random.default_rng(k)
    train = rng.normal(size=(3000, 8))
    queries = rng.normal(size=(200, 8))
    expected = knn(queries, da.from_array(train, chunks=(1000, -1)), k, tile_rows=700)
    got = knn(to_device(queries), device_chunks(train, 1000), k, tile_rows=700)
    np.testing.assert_array_equal(to_numpy(got[1]), expected[1])
    np.testing.assert_allclose(to_numpy(got[0]), expected[0], rtol=RTOL, atol=ATOL)


def test_local_ridge_on_device_equals_cpu():
    """The kernel path (batched eigh of 36 x 36 fold blocks), its Cholesky-certified solves
    (posv on CuPy) and the exact SVD path (above 32 x 32: LAPACK on the host under CuPy)
    for nearly rank-deficient items."""
    rng = np.random.default_rng(5)
    b, k, d = 48, 72, 40
    x = rng.normal(size=(b, k, d))
    x[::3] = x[::3] @ np.diag(np.geomspace(1.0, 1e-9, d))  # ill-conditioned items
    y = np.tanh(x[:, :, :5]) + 0.01 * rng.normal(size=(b, k, 5))
    q = rng.normal(size=(b, d))
    expected = local_ridge(x, y, q)
    got = local_ridge(to_device(x), to_device(y), to_device(q))
    assert expected.n_exact > 0 and got.n_exact == expected.n_exact
    np.testing.assert_allclose(to_numpy(got.prediction), expected.prediction, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(to_numpy(got.alpha), expected.alpha)


def test_cumulants_on_device_equal_cpu():
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 40, size=60)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    features = rng.gamma(2.0, size=(offsets[-1], 7)) * rng.uniform(0.1, 10, size=7)
    for signed in (True, False):
        expected = structure_cumulants(features, offsets, 5, signed=signed)
        got = structure_cumulants(to_device(features), offsets, 5, signed=signed)
        np.testing.assert_allclose(to_numpy(got), expected, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def workers():
    """A LocalCUDACluster (one worker per GPU), or in the dry run a LocalCluster of one
    thread worker in this process (the models are loaded once, for speed)."""
    if MODE == "cuda":
        with cluster.connected(gpu=True, dashboard_address=":0", quiet=True) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as local,
        Client(local) as client,
    ):
        yield client


@pytest.fixture
def structures_store(sample_store, tmp_path) -> str:
    """The sample store's 27 structures (531 atoms); in the dry run its first 3."""
    sample = Store.open(sample_store)
    n = sample.n_structures if MODE == "cuda" else 3
    path = str(tmp_path / "structures.zarr")
    store = Store.create(path, chunk_atoms=64)
    store.append(StructureBlock.from_atoms(read_frames(sample, 0, n)))
    return path


# the dry run featurizes SevenNet-0 on its LocalCluster in the featurize benchmark step
MODELS = ["chgnet-0.3.0", "sevennet-0"] if MODE == "cuda" else ["chgnet-0.3.0"]


@pytest.mark.parametrize("model", MODELS)
def test_featurize_on_the_cluster_equals_cpu_features(workers, structures_store, model):
    featurize(structures_store, model, device="cuda" if MODE == "cuda" else "cpu")
    store = Store.open(structures_store)
    frames = read_frames(store, 0, store.n_structures)
    extractor = load_extractor(model, "cpu")
    usable = [a for a in frames if extractor.unsupported_reason(a) is None]
    expected = extractor.featurize(usable, ["bb", "ll"])
    for layer in ("bb", "ll"):
        got = np.asarray(store.features(f"{model}/{layer}").compute())
        got = got[~np.isnan(got).any(axis=1)]
        np.testing.assert_allclose(got, expected[layer], rtol=FEATURE_TOL, atol=FEATURE_TOL)


@pytest.mark.skipif(MODE != "cuda", reason="an RMM pool needs GPU workers")
def test_lfre_on_workers_with_an_rmm_pool():
    sets = feature_sets(1000, (5, 7), seed=4)
    selection = make_selection("kfold:2", 1000, seed=0)
    expected = lfre_matrix(sets, selection, k=10, query_block=128)
    with cluster.connected(
        gpu=True, rmm_pool_size="2GB", dashboard_address=":0", quiet=True
    ) as client:

        def allocator():
            import cupy
            import rmm

            return rmm.is_initialized(), cupy.cuda.get_allocator().__module__

        for initialised, module in client.run(allocator).values():
            assert initialised and "rmm" in module
        got = lfre_matrix(sets, selection, k=10, query_block=128, device="cuda")
    np.testing.assert_allclose(got.pointwise, expected.pointwise, rtol=RTOL, atol=ATOL)
