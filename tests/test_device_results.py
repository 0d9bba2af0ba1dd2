"""A client without CuPy gets numpy results from GPU workers, and kNN results stay put.

On a login node the client process has no CuPy, while the dask-cuda workers hold CuPy
chunks: anything of a device type that reached the client would fail to unpickle there.
Here real worker processes (a LocalCluster) hold chunks of an ``__array_function__`` duck
type defined in a module that only the workers can import, standing for CuPy: numpy's
functions, ufuncs and methods on it return it again, so a result the engines forgot to
convert to numpy inside a task reaches the client as that type and its unpickling fails.
The client never imports the module. (Operations that convert to numpy on the worker,
``np.asarray`` first of all, end the chain there; CuPy would stay on the device: these
tests catch the results made by numpy functions and methods of the chunks, not all.)

The kNN indices of LFRE must go from the kNN tasks straight into the local-ridge tasks on
the workers: the scheduler's ``gather`` handler is recorded, and no kNN key may be in it.
"""

import importlib
import sys

import dask
import dask.array as da
import distributed
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dfre.data.selection import make_selection
from dfre.descriptors.cumulants import cumulant_descriptor, structure_fre
from dfre.metrics import gfre_matrix
from dfre.metrics.lfre import lfre_matrix
from dfre.store import Store

DEVICE_MODULE = "dfre_test_worker_only_arrays"
DEVICE_SOURCE = '''
import numpy as np


def unwrap(x):
    if isinstance(x, WorkerOnlyArray):
        return x.data
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: unwrap(v) for k, v in x.items()}
    return x


def wrap(x):
    if isinstance(x, (np.ndarray, np.generic)):
        return WorkerOnlyArray(x)
    if isinstance(x, (list, tuple)):
        return type(x)(wrap(v) for v in x)
    return x


class WorkerOnlyArray(np.lib.mixins.NDArrayOperatorsMixin):
    """Stands for a GPU array: not numpy (so pickled, never sent as a numpy buffer), and
    every numpy function, ufunc, method and index on it returns this type again, as CuPy
    does; np.asarray gives the host copy."""

    def __init__(self, data):
        self.data = np.asarray(data)

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        result = getattr(ufunc, method)(*unwrap(inputs), **unwrap(kwargs))
        out = kwargs.get("out")
        return out[0] if out and len(out) == 1 else wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        return wrap(func(*unwrap(args), **unwrap(kwargs)))

    def __getattr__(self, name):
        if name.startswith("__") or name == "data":
            raise AttributeError(name)
        attr = getattr(self.data, name)
        if callable(attr):
            return lambda *args, **kwargs: wrap(attr(*unwrap(args), **unwrap(kwargs)))
        return wrap(attr) if name not in ("shape", "dtype", "ndim", "size") else attr

    def __getitem__(self, key):
        return wrap(self.data[unwrap(key)])

    def __setitem__(self, key, value):
        self.data[unwrap(key)] = unwrap(value)

    def __len__(self):
        return len(self.data)

    def __bool__(self):
        return bool(self.data)

    def __float__(self):
        return float(self.data)

    def __int__(self):
        return int(self.data)

    def __index__(self):
        return int(self.data)


def to_device(block):
    return WorkerOnlyArray(block)
'''


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker-only")
    (folder / f"{DEVICE_MODULE}.py").write_text(DEVICE_SOURCE)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        client.run(lambda: sys.path.insert(0, str(folder)))  # the workers' own sys.path
        yield client
    assert DEVICE_MODULE not in sys.modules  # the client never had the device type


def on_device(x: np.ndarray, rows: int) -> da.Array:
    """``x`` as a dask array whose chunks, made on the workers, are the device type."""
    return da.from_array(x, chunks=(rows, -1)).map_blocks(
        lambda block: importlib.import_module(DEVICE_MODULE).to_device(block),
        dtype=x.dtype,
        meta=np.empty((0, 0), dtype=x.dtype),
    )


def feature_sets(n: int, dims=(6, 9, 4), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    return [
        np.tanh(latent @ rng.normal(size=(3, d))) + 0.05 * rng.normal(size=(n, d)) for d in dims
    ]


def test_the_client_cannot_unpickle_a_device_chunk(client):
    """The premise of this file: the workers make device chunks, and one brought back to
    the client fails there."""
    chunks = on_device(np.ones((4, 2)), 2)
    kinds = chunks.map_blocks(
        lambda block: np.full((1, 1), type(block).__name__), dtype=object, chunks=(1, 1)
    )
    assert set(kinds.compute().ravel()) == {"WorkerOnlyArray"}
    future = client.compute(chunks)
    distributed.wait(future)
    assert future.status == "finished"  # computed on a worker without error
    with pytest.raises(ModuleNotFoundError, match=DEVICE_MODULE):
        future.result()


@pytest.mark.parametrize("solver", ["gram", "tsqr"])
def test_gfre_from_device_chunks_is_numpy_on_the_client(client, solver):
    sets = feature_sets(600)
    selection = (np.arange(0, 600, 3), np.setdiff1d(np.arange(600), np.arange(0, 600, 3)))
    with dask.config.set(scheduler="sync"):
        expected = gfre_matrix(sets, selection, solver=solver, pointwise=True)
    got = gfre_matrix([on_device(s, 128) for s in sets], selection, solver=solver, pointwise=True)
    assert type(got.matrix) is np.ndarray and type(got.pointwise) is np.ndarray
    np.testing.assert_allclose(got.matrix, expected.matrix, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.cka, expected.cka, rtol=1e-10)


def test_lfre_from_device_chunks_keeps_the_knn_on_the_workers(client):
    sets = feature_sets(500, dims=(5, 8))
    selection = make_selection("kfold:2", 500, seed=0)
    with dask.config.set(scheduler="sync"):
        expected = lfre_matrix(sets, selection, k=12, query_block=64)
    scheduler = client.cluster.scheduler
    gather = scheduler.handlers["gather"]
    gathered = []

    async def recording_gather(keys, serializers=None):  # the handler's own signature
        gathered.extend(str(key) for key in keys)
        return await gather(keys=keys, serializers=serializers)

    scheduler.handlers["gather"] = recording_gather
    try:
        got = lfre_matrix([on_device(s, 100) for s in sets], selection, k=12, query_block=64)
    finally:
        scheduler.handlers["gather"] = gather
    assert gathered, "the client gathered nothing: the recording is not in place"
    knn_keys = ("_knn_scaled", "merge_neighbours", "_knn_indices")
    assert not [key for key in gathered if any(name in key for name in knn_keys)]
    assert type(got.pointwise) is np.ndarray and type(got.alpha) is np.ndarray
    np.testing.assert_allclose(got.pointwise, expected.pointwise, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.matrix, expected.matrix, rtol=1e-10, atol=1e-12)


def test_lfre_refuses_non_finite_device_chunks_with_one_line(client):
    sets = feature_sets(200, dims=(4, 5))
    sets[1][17, 2] = np.nan
    selection = make_selection("kfold:2", 200, seed=0)
    with pytest.raises(Exception, match="NaN or infinite") as error:
        lfre_matrix([on_device(s, 64) for s in sets], selection, k=6)
    assert type(error.value).__name__ == "DfreError"


def test_structure_fre_of_device_cumulants(client, sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    rng = np.random.default_rng(3)
    atoms = rng.normal(size=(store.n_atoms, 3))
    phi = cumulant_descriptor(on_device(atoms, 64), store.offsets, 3, chunk_rows=64)
    other = rng.normal(size=(store.n_structures, 4))
    sets = {"phi": phi, "other": on_device(other, 8)}
    got = structure_fre(store, sets, selection="kfold:2", run="dev")
    with dask.config.set(scheduler="sync"):
        host = {"phi": cumulant_descriptor(atoms, store.offsets, 3), "other": other}
        expected = structure_fre(store, host, selection="kfold:2", run="host")
    assert type(got.matrix) is np.ndarray
    np.testing.assert_allclose(got.matrix, expected.matrix, rtol=1e-10, atol=1e-12)
