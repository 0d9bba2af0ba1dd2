import numpy as np
import pytest
import zarr

from dfre.data.selection import (
    Selection,
    make_selection,
    selection_for_store,
    stratified_quotas,
)
from dfre.errors import DfreError


def _labels():
    # three subsets of very different sizes: 600, 300, 100 rows, interleaved
    labels = np.array(["a"] * 600 + ["b"] * 300 + ["c"] * 100, dtype=object)
    return np.random.default_rng(1).permutation(labels)


def test_random_split_is_a_partition_and_deterministic():
    sel = make_selection("random:50", 1000, seed=3)
    assert len(sel.test) == 50 and len(sel.train) == 950
    assert np.array_equal(np.union1d(sel.train, sel.test), np.arange(1000))
    assert np.all(np.diff(sel.test) > 0) and sel.test.dtype == np.int64
    assert sel == make_selection("random:50", 1000, seed=3)
    assert not np.array_equal(sel.test, make_selection("random:50", 1000, seed=4).test)


def test_stratified_proportions_follow_subset_sizes():
    labels = _labels()
    sel = make_selection("stratified:100", 1000, labels=labels, seed=0)
    picked = labels[sel.test]
    assert {k: int((picked == k).sum()) for k in "abc"} == {"a": 60, "b": 30, "c": 10}
    assert len(sel.train) == 900
    # proportions with rounding: 7 out of (600, 300, 100) -> 4.2, 2.1, 0.7 -> 4, 2, 1
    assert stratified_quotas(np.array([600, 300, 100]), 7).tolist() == [4, 2, 1]
    # a tiny subset still gets one test environment when N allows
    assert stratified_quotas(np.array([990, 9, 1]), 10).tolist() == [8, 1, 1]
    assert stratified_quotas(np.array([990, 9, 1]), 10).sum() == 10


def test_stratified_never_selects_invalid_rows():
    labels = _labels()
    valid = np.ones(1000, bool)
    valid[::3] = False
    sel = make_selection("stratified:100", 1000, labels=labels, seed=0, valid=valid)
    assert valid[sel.test].all() and valid[sel.train].all()
    assert len(sel.train) + len(sel.test) == valid.sum()


def test_kfold_tests_every_row_exactly_once():
    valid = np.ones(103, bool)
    valid[[5, 50]] = False
    sel = make_selection("kfold:5", 103, seed=2, valid=valid)
    assert sel.n_folds == 5
    tested = sel.test_rows()
    assert np.array_equal(np.sort(tested), np.flatnonzero(valid))
    for train, test in sel.folds:
        assert np.array_equal(np.union1d(train, test), np.flatnonzero(valid))
        assert len(test) in (20, 21)


def test_structure_selection_keeps_structures_whole():
    groups = np.repeat(np.arange(40), np.arange(1, 41))
    sel = make_selection("structure:5", len(groups), groups=groups, seed=0)
    test_structures = np.unique(groups[sel.test])
    assert len(test_structures) == 5
    assert not np.isin(groups[sel.train], test_structures).any()
    assert len(sel.test) == np.isin(groups, test_structures).sum()


def test_save_load_round_trip(tmp_path):
    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    for spec in ["kfold:3", "random:7"]:
        sel = make_selection(spec, 40, seed=9)
        sel.save(root.create_group(spec.replace(":", "_")))
        assert Selection.load(root[spec.replace(":", "_")]) == sel
    explicit = Selection.explicit([3, 1, 2], [7, 0], 10)
    explicit.save(root.create_group("e"))
    loaded = Selection.load(root["e"])
    assert loaded.train.tolist() == [1, 2, 3] and loaded.test.tolist() == [0, 7]


def test_selection_for_store_uses_subsets(sample_store):
    from dfre.store import Store

    store = Store.open(sample_store)
    sel = selection_for_store("stratified:50", store, seed=1)
    labels = store.subsets()[store.structure_index()]
    names, sizes = np.unique(labels, return_counts=True)
    quotas = stratified_quotas(sizes, 50)
    picked = labels[sel.test]
    assert [int((picked == n).sum()) for n in names] == quotas.tolist()
    assert len(sel.train) + 50 == store.n_atoms


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bogus:3", "unknown selection"),
        ("random:x", "whole number"),
        ("random:0", "positive"),
        ("random:2000", "only 1000"),
        ("kfold:1", "at least 2 folds"),
        ("stratified:10", "subset label"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DfreError, match=message):
        make_selection(spec, 1000)


def test_overlapping_explicit_selection_is_refused():
    with pytest.raises(DfreError, match="both in train and test"):
        Selection.explicit([1, 2], [2, 3], 5)
