"""Partitioned exact kNN against float64 brute force (skmatter's distance formula)."""

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dfre.errors import DfreError
from dfre.linalg.knn import knn, knn_partition, merge_neighbours, smallest_by_bisection


def brute_force(queries, train, k):
    """skmatter's squared distances, neighbours by a stable argsort (ties: lower index)."""
    q, t = queries.astype(np.float64), train.astype(np.float64)
    dist = np.sum(t**2, axis=1) + np.sum(q**2, axis=1)[:, np.newaxis] - 2 * q @ t.T
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(3000, 7))
    queries = rng.normal(size=(150, 7))
    return queries, train


def test_partition_equals_brute_force_with_small_tiles(data):
    queries, train = data
    dist, idx = knn_partition(queries, train, 25, tile_rows=128)
    ref_dist, ref_idx = brute_force(queries, train, 25)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=1e-12)
    assert dist.dtype == np.float64 and idx.dtype == np.int64


def test_dask_partitions_and_tree_merge_equal_brute_force(data):
    queries, train = data
    # 7 uneven train partitions and 3 query blocks: every tile is merged by the tree
    q = da.from_array(queries, chunks=(64, 7))
    t = da.from_array(train, chunks=(450, 7))
    dist, idx = knn(q, t, 40, query_block=64, tile_rows=200)
    ref_dist, ref_idx = brute_force(queries, train, 40)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=1e-12)


def test_float32_input_uses_float64_distances(data):
    queries, train = (a.astype(np.float32) for a in data)
    _, idx = knn(queries, train, 10)
    _, ref_idx = brute_force(queries, train, 10)
    np.testing.assert_array_equal(idx, ref_idx)


def test_shift_and_scale_are_applied_in_the_tasks(data):
    queries, train = data
    shift, scale = train.mean(axis=0), 3.7
    dist, idx = knn(queries, train, 12, shift=shift, scale=scale)
    ref_dist, ref_idx = brute_force((queries - shift) / scale, (train - shift) / scale, 12)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=1e-14)


def test_exact_ties_are_deterministic_and_ordered_by_index():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 3, size=(40, 3)).astype(np.float64)  # many duplicate rows
    train = np.concatenate([base, base, base])
    queries = rng.integers(0, 3, size=(30, 3)).astype(np.float64)
    ref_dist, ref_idx = brute_force(queries, train, 17)
    for chunk, tile in [(120, 120), (7, 5), (33, 16)]:
        dist, idx = knn(
            queries, da.from_array(train, chunks=(chunk, 3)), 17, query_block=11, tile_rows=tile
        )
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(dist, ref_dist)


def test_merge_keeps_the_best_k_in_order():
    a = (np.array([[0.1, 0.5, 0.9]]), np.array([[4, 2, 7]]))
    b = (np.array([[0.5, 0.6, 2.0]]), np.array([[1, 3, 0]]))
    dist, idx = merge_neighbours(a, b, 4)
    np.testing.assert_array_equal(idx, [[4, 1, 2, 3]])
    np.testing.assert_array_equal(dist, [[0.1, 0.5, 0.5, 0.6]])


@pytest.mark.parametrize("k", [1, 5, 37, 200])
def test_bisection_selects_the_k_smallest_with_ties_by_position(k):
    """The GPU selection for large k (no sort) keeps exactly what a stable sort keeps:
    negative and duplicated distances, -0.0 next to +0.0, huge and tiny magnitudes."""
    rng = np.random.default_rng(k)
    dist = rng.integers(-3, 6, size=(40, 300)).astype(np.float64)  # many exact ties
    dist[:10] = rng.normal(size=(10, 300)) * 10.0 ** rng.integers(-300, 300, size=(10, 1))
    dist[10, -150:] = -0.0  # equal to +0.0: earlier positions win
    dist[11] = 0.0
    cols = smallest_by_bisection(dist, k)
    expected = np.sort(np.argsort(dist, axis=1, kind="stable")[:, :k], axis=1)
    np.testing.assert_array_equal(cols, expected)


def test_knn_on_a_distributed_cluster(data):
    queries, train = data
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        _, idx = knn(queries, da.from_array(train, chunks=(1000, 7)), 9, query_block=50)
    np.testing.assert_array_equal(idx, brute_force(queries, train, 9)[1])


def test_bad_k_and_shapes(data):
    queries, train = data
    with pytest.raises(DfreError, match="only 3000 train rows"):
        knn(queries, train, 3001)
    with pytest.raises(DfreError, match="at least 1"):
        knn(queries, train, 0)
    with pytest.raises(DfreError, match="features"):
        knn(queries[:, :3], train, 3)
