"""Numerical guards: features with a huge dynamic range (columns from 1e-8 to 1e8),
rank-deficient feature sets and near-duplicate rows give finite results equal to
scikit-matter's; a feature set without variance or with non-finite values is a clear
error; the report of such results holds no NaN.

Documented behaviour: the ``gram`` solver (normal equations) resolves singular values
down to about 1e-8 of the largest, so on a 1e16 dynamic range it differs from
scikit-matter in the 5th digit; ``solver="tsqr"`` follows scikit-matter there, and so
does the default ``"auto"``, which detects such spectra and takes the TSQR path.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from skmatter.metrics import global_reconstruction_error, local_reconstruction_error

from dfre.data.selection import make_selection
from dfre.descriptors.cumulants import structure_cumulants
from dfre.errors import DfreError
from dfre.metrics.gfre import gfre_matrix, gfre_store
from dfre.metrics.lfre import lfre_matrix, lfre_store
from dfre.report import make_report
from dfre.store import Store


def hard_sets(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4))
    huge = (base @ rng.normal(size=(4, 6))) * np.logspace(-8, 8, 6)
    rank_deficient = base[:, :3] @ rng.normal(size=(3, 8))  # rank 3 in 8 columns
    near_duplicates = np.tanh(base @ rng.normal(size=(4, 5)))
    near_duplicates[1::2] = near_duplicates[0::2][: n // 2] + 1e-12 * rng.normal(size=(n // 2, 5))
    return {"huge/x": huge, "rank/x": rank_deficient, "dup/x": near_duplicates}


@pytest.fixture(scope="module")
def data():
    sets = list(hard_sets(300).values())
    return sets, make_selection("random:60", 300, seed=1)


def test_gfre_is_finite_and_equals_skmatter(data):
    sets, selection = data
    train, test = selection.train, selection.test
    want = np.array(
        [[global_reconstruction_error(a, b, train_idx=train, test_idx=test) for b in sets]
         for a in sets]
    )  # fmt: skip
    tsqr = gfre_matrix(sets, selection, solver="tsqr", pointwise=True)
    gram = gfre_matrix(sets, selection, solver="gram", pointwise=True)
    auto = gfre_matrix(sets, selection)
    for result in (tsqr, gram, auto):
        assert np.isfinite(result.matrix).all() and np.isfinite(result.pointwise).all()
        assert np.isfinite(result.cka).all()
    np.testing.assert_allclose(tsqr.matrix, want, atol=1e-8)
    np.testing.assert_allclose(auto.matrix, want, atol=1e-8)
    assert auto.config["solver_used"] == "tsqr" and "X0" in auto.config["exact_path_for"]
    np.testing.assert_allclose(gram.matrix, want, atol=1e-4)
    np.testing.assert_allclose(gram.matrix[1:], want[1:], atol=1e-8)  # sources of modest range


def test_lfre_is_finite_and_equals_skmatter(data):
    sets, selection = data
    train, test = selection.train, selection.test
    want = np.array(
        [[local_reconstruction_error(a, b, min(a.shape[1], b.shape[1]), train_idx=train,
                                     test_idx=test) for b in sets] for a in sets]
    )  # fmt: skip
    got = lfre_matrix(sets, selection)
    assert np.isfinite(got.matrix).all() and np.isfinite(got.pointwise).all()
    np.testing.assert_allclose(got.matrix, want, atol=1e-8)


@pytest.mark.parametrize("metric", [gfre_matrix, lfre_matrix])
def test_constant_or_non_finite_feature_sets_are_errors(data, metric):
    sets, selection = data
    constant = np.full((300, 3), 2.5)
    with pytest.raises(DfreError, match=r"variance|constant"):
        metric({"good": sets[2], "flat": constant}, selection)
    broken = sets[2].copy()
    broken[selection.test[0], 1] = np.nan
    with pytest.raises(DfreError, match=r"NaN|non-finite|not finite"):
        metric({"good": sets[1], "broken": broken}, selection)


def test_cumulants_of_a_huge_range_are_finite():
    values = hard_sets(40)["huge/x"]
    offsets = np.array([0, 7, 20, 21, 40])
    phi = np.asarray(structure_cumulants(values, offsets, 4))
    assert phi.shape == (4, 4 * 6) and np.isfinite(phi).all()
    means = [values[a:b].mean(axis=0) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    np.testing.assert_allclose(phi[:, :6], np.array(means), rtol=1e-12)
    assert (phi[2, 6:] == 0).all()  # one atom: no spread


def test_report_of_hard_data_has_no_nan(sample_store_copy, tmp_path):
    store = Store.open(sample_store_copy, mode="r+")
    for name, values in hard_sets(store.n_atoms).items():
        store.create_feature(name, values.shape[1])[...] = values.astype(np.float32)
    names = list(hard_sets(4))
    gfre = gfre_store(store, names, "stratified:60", solver="tsqr")
    lfre = lfre_store(store, names, "stratified:60")
    for result in (gfre, lfre):
        assert np.isfinite(result.matrix).all() and np.isfinite(result.pointwise).all()
    report = make_report(Store.open(sample_store_copy), tmp_path / "report")
    assert report.figures and not report.skipped
    for path in [report.html, *[f for f in report.figures if f.endswith((".svg", ".html"))]]:
        text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", open(path).read())  # embedded images
        assert not re.search(r"\bnan\b", text, re.IGNORECASE), path
