"""Cumulant descriptors: the recursion against exact cumulants of known distributions and
the SI formulas, the per-structure kernel against direct formulas, Dask streaming, the
store round trip, and bad input."""

from __future__ import annotations

import re
import warnings
from fractions import Fraction
from math import factorial

import dask.array as da
import numpy as np
import pytest
import scipy.stats
import zarr
from distributed import Client, LocalCluster

from dfre.cli import main
from dfre.descriptors.cumulants import (
    CumulantNotice,
    aligned_row_chunks,
    compute_cumulants,
    cumulant_block,
    cumulant_descriptor,
    cumulants_from_central_moments,
    cumulants_from_moments,
    cumulative_feature_sets,
    descriptor_name,
    structure_cumulants,
)
from dfre.errors import DfreError
from dfre.store import Store, StructureBlock


# ---------------------------------------------------------------------- exact references
def si_cumulants(mu: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """SI eqs. S2-S9, written out (recursion-free) as the independent reference."""
    return {
        2: mu[2],
        3: mu[3],
        4: mu[4] - 3 * mu[2] ** 2,
        5: mu[5] - 10 * mu[2] * mu[3],
        6: mu[6] - 15 * mu[2] * mu[4] - 10 * mu[3] ** 2 + 30 * mu[2] ** 3,
        7: mu[7] - 21 * mu[2] * mu[5] - 35 * mu[3] * mu[4] + 210 * mu[3] * mu[2] ** 2,
        8: mu[8]
        - 28 * mu[2] * mu[6]
        - 56 * mu[3] * mu[5]
        - 35 * mu[4] ** 2
        + 420 * mu[4] * mu[2] ** 2
        + 560 * mu[3] ** 2 * mu[2]
        - 630 * mu[2] ** 4,
    }


def stirling2(n: int, k: int) -> int:
    table = [[1]]
    for i in range(1, n + 1):
        row = [0] * (i + 1)
        for j in range(1, i + 1):
            row[j] = j * (table[i - 1][j] if j < i else 0) + table[i - 1][j - 1]
        table.append(row)
    return table[n][k]


def test_exponential_exact_cumulants():
    lam = Fraction(3, 2)
    raw = [Fraction(factorial(n)) / lam**n for n in range(1, 15)]
    kappas = cumulants_from_moments(raw)
    assert kappas == [Fraction(factorial(n - 1)) / lam**n for n in range(1, 15)]


def test_poisson_exact_cumulants():
    lam = Fraction(7, 3)
    raw = [sum(stirling2(n, k) * lam**k for k in range(1, n + 1)) for n in range(1, 13)]
    assert cumulants_from_moments(raw) == [lam] * 12


def test_gaussian_exact_cumulants_raw_and_central():
    mean, var = Fraction(-2, 5), Fraction(9, 4)
    raw = [mean, var + mean**2]
    for n in range(3, 13):  # m_n = mean m_{n-1} + (n-1) var m_{n-2}
        raw.append(mean * raw[-1] + (n - 1) * var * raw[-2])
    assert cumulants_from_moments(raw) == [mean, var] + [0] * 10
    central = [0 if n % 2 else var ** (n // 2) * _double_factorial(n - 1) for n in range(2, 13)]
    assert cumulants_from_central_moments(mean, central) == [mean, var] + [0] * 10


def _double_factorial(n: int) -> int:
    return 1 if n <= 0 else n * _double_factorial(n - 2)


def test_recursion_matches_si_formulas_up_to_order_8():
    rng = np.random.default_rng(1)
    mu = {k: rng.normal(size=(5, 3)) for k in range(2, 9)}
    kappas = cumulants_from_central_moments(np.zeros((5, 3)), [mu[k] for k in range(2, 9)])
    for k, expected in si_cumulants(mu).items():
        np.testing.assert_allclose(kappas[k - 1], expected, rtol=1e-12, atol=1e-12)


def test_kernel_matches_si_formulas_per_structure():
    rng = np.random.default_rng(2)
    counts = np.array([3, 17, 1, 250, 40])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    x = rng.gamma(2.0, size=(offsets[-1], 4)) * rng.normal(size=4)
    phi = structure_cumulants(x, offsets, 8)
    raw = structure_cumulants(x, offsets, 8, signed=False)
    assert phi.shape == raw.shape == (5, 32) and phi.dtype == np.float64
    for s in range(5):
        xs = x[offsets[s] : offsets[s + 1]]
        centred = xs - xs.mean(axis=0)
        mu = {k: (centred**k).mean(axis=0) for k in range(2, 9)}
        expected = {1: xs.mean(axis=0), **si_cumulants(mu)}
        for k in range(1, 9):
            scale = np.abs(centred).max() ** k + 1e-300
            np.testing.assert_allclose(raw[s, (k - 1) * 4 : k * 4], expected[k], atol=1e-10 * scale)
            np.testing.assert_allclose(
                cumulant_block(phi, k, 4)[s],
                np.sign(expected[k]) * np.abs(expected[k]) ** (1 / k),
                rtol=1e-8,
                atol=1e-8 * np.abs(centred).max(),
            )


def test_plug_in_cumulants_against_scipy_kstat():
    # kstat gives unbiased k-statistics; our estimates are the cumulants of the empirical
    # distribution (m_k central sample moments); convert with the exact relations.
    rng = np.random.default_rng(3)
    x = rng.exponential(size=(200, 1))
    n = len(x)
    kappa = structure_cumulants(x, [0, n], 4, signed=False)[0]
    m2, m3 = kappa[1], kappa[2]
    m4 = kappa[3] + 3 * m2**2
    k = {j: scipy.stats.kstat(x[:, 0], j) for j in range(1, 5)}
    np.testing.assert_allclose(k[1], kappa[0], rtol=1e-12)
    np.testing.assert_allclose(k[2], n / (n - 1) * m2, rtol=1e-12)
    np.testing.assert_allclose(k[3], n**2 / ((n - 1) * (n - 2)) * m3, rtol=1e-12)
    expected_k4 = n**2 * ((n + 1) * m4 - 3 * (n - 1) * m2**2) / ((n - 1) * (n - 2) * (n - 3))
    np.testing.assert_allclose(k[4], expected_k4, rtol=1e-10)


def test_large_samples_of_known_distributions():
    rng = np.random.default_rng(4)
    n = 400_000
    lam = 2.0
    x = np.column_stack([rng.exponential(1 / lam, n), rng.normal(1.5, 0.5, n)])
    kappa = structure_cumulants(x, [0, n], 4, signed=False)[0].reshape(4, 2)
    exponential = [factorial(k - 1) / lam**k for k in range(1, 5)]
    np.testing.assert_allclose(kappa[:, 0], exponential, rtol=0.05)
    np.testing.assert_allclose(kappa[:2, 1], [1.5, 0.25], rtol=0.01)
    np.testing.assert_allclose(kappa[2:, 1], 0.0, atol=0.01 * 0.5**3)


def test_stable_for_large_offset_large_structure_and_high_order():
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(100_000, 2)) * [0.01, 1.0]
    reference = structure_cumulants(noise, [0, 100_000], 4)
    shifted = structure_cumulants(noise + 1e6, [0, 100_000], 4)
    np.testing.assert_allclose(shifted[0, 2:], reference[0, 2:], rtol=1e-6)
    np.testing.assert_allclose(shifted[0, :2] - 1e6, reference[0, :2], atol=1e-8)
    # homogeneity: phi(s x) = s phi(x), no overflow at order 24 with |x| ~ 1e8
    small = rng.normal(size=(500, 3))
    phi = structure_cumulants(small, [0, 200, 500], 24)
    phi_scaled = structure_cumulants(small * 1e8, [0, 200, 500], 24)
    assert np.isfinite(phi_scaled).all()
    np.testing.assert_allclose(phi_scaled, 1e8 * phi, rtol=1e-9, atol=1e-6)


def test_single_atom_structures_give_zero_and_a_notice():
    x = np.array([[1.0, -2.0], [3.0, 1.0], [5.0, 2.0], [7.0, 7.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division by zero
        with pytest.warns(CumulantNotice, match="2 structure.*single atom.*structure 0"):
            phi = cumulant_descriptor(x, [0, 1, 3, 4], 5).compute()
    np.testing.assert_array_equal(phi[0], [1.0, -2.0] + [0.0] * 8)
    np.testing.assert_array_equal(phi[2], [7.0, 7.0] + [0.0] * 8)
    np.testing.assert_allclose(phi[1, :4], [4.0, 1.5, 1.0, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CumulantNotice)  # order 1 needs no notice
        cumulant_descriptor(x, [0, 1, 3, 4], 1).compute()


def test_aligned_chunks_fall_on_structure_boundaries():
    offsets = np.array([0, 5, 9, 40, 41, 47, 60])
    chunks = aligned_row_chunks(offsets, 8)
    edges = np.cumsum((0,) + chunks)
    assert set(edges) <= set(offsets) and edges[-1] == 60
    assert chunks == (5, 4, 31, 7, 13)  # the 31-atom structure has a chunk of its own


def test_dask_streaming_equals_kernel_on_a_distributed_cluster():
    rng = np.random.default_rng(6)
    counts = rng.integers(1, 30, size=300)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    x = rng.normal(size=(offsets[-1], 3)).astype(np.float32)
    expected = structure_cumulants(x, offsets, 6)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", CumulantNotice)
        for chunk in (97, 1000, 100_000):
            lazy = cumulant_descriptor(da.from_array(x, chunks=(chunk, 3)), offsets, 6)
            assert lazy.numblocks[0] == len(aligned_row_chunks(offsets, chunk))
            np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-12)


def test_cumulative_feature_sets_are_prefixes():
    phi = np.arange(2 * 12, dtype=float).reshape(2, 12)
    sets = cumulative_feature_sets(phi, 3)
    assert list(sets) == ["phi(1)", "phi(2)", "phi(3)", "phi(4)"]
    np.testing.assert_array_equal(sets["phi(2)"], phi[:, :6])
    with pytest.raises(DfreError, match="order 5 is not in the descriptor"):
        cumulative_feature_sets(phi, 3, orders=[5])


# ---------------------------------------------------------------------- store and CLI
LOCAL = ["--workers", "1", "--dashboard-address", ":0"]


def make_store(path, counts, dim=3, mask_rows=()):
    rng = np.random.default_rng(7)
    store = Store.create(path, chunk_atoms=16)
    frames_counts = np.asarray(counts)
    n = int(frames_counts.sum())
    block = StructureBlock(
        numbers=np.full(n, 14, np.int16),
        positions=rng.normal(size=(n, 3)),
        counts=frames_counts,
        cell=np.zeros((len(counts), 3, 3)),
        pbc=np.zeros((len(counts), 3), bool),
    )
    store.append(block)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    store.create_feature("toy/ll", dim)[:] = features
    if mask_rows:
        mask = np.zeros(n, bool)
        mask[list(mask_rows)] = True
        group = store.group["features"]["toy"]
        group.create_array("_mask", shape=(n,), dtype="bool", chunks=(n,))[:] = mask
    return store, features


def test_compute_cumulants_writes_a_complete_descriptor(tmp_path):
    counts = [4, 7, 2, 30, 5, 9]
    store, features = make_store(tmp_path / "s.zarr", counts, mask_rows=[12])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    name = compute_cumulants(store, "toy/ll", 4)
    assert name == descriptor_name("toy/ll", 4) == "cumulants-toy-ll-M4"
    values = Store.open(tmp_path / "s.zarr").descriptor(name)
    expected = structure_cumulants(features, offsets, 4)
    assert np.isnan(values[2]).all()  # atom 12 is in structure 2 (rows 11:13)
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(values[keep], expected[keep], rtol=1e-12)
    attrs = zarr.open_group(tmp_path / "s.zarr")["descriptors"][name].attrs
    assert attrs["complete"] and attrs["order"] == 4 and attrs["dim"] == 3
    assert attrs["masked_structures"] == 1


def test_cli_cumulants_writes_descriptor_and_prints_notice(tmp_path, capsys):
    store, features = make_store(tmp_path / "s.zarr", [3, 1, 6])
    assert main(["cumulants", "--store", str(tmp_path / "s.zarr"), "--order", "3", *LOCAL]) == 0
    out, err = capsys.readouterr()
    assert "descriptors/cumulants-toy-ll-M3" in out
    assert "dfre: notice: toy/ll: 1 structure(s) have a single atom" in err
    assert re.search(r"^\d\d:\d\d:\d\d dfre: descriptors/cumulants-toy-ll-M3: cumulants of "
                     r"toy/ll up to order 3: done in", err, re.M)  # fmt: skip
    values = Store.open(tmp_path / "s.zarr").descriptor("cumulants-toy-ll-M3")
    np.testing.assert_allclose(values, structure_cumulants(features, [0, 3, 4, 10], 3))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--order", "0"], "cumulant order must be an integer >= 1 (got 0)"),
        (["--features", "nope/ll"], "no feature set 'nope/ll'"),
    ],
)
def test_cli_cumulants_bad_input(tmp_path, capsys, argv, message):
    make_store(tmp_path / "s.zarr", [3, 2])
    before = sorted(p.name for p in (tmp_path / "s.zarr" / "descriptors").iterdir())
    assert main(["cumulants", "--store", str(tmp_path / "s.zarr"), *argv, *LOCAL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfre: error: ") and message in err and err.count("\n") == 1
    after = sorted(p.name for p in (tmp_path / "s.zarr" / "descriptors").iterdir())
    assert before == after


def test_library_bad_input():
    x = np.zeros((4, 2))
    with pytest.raises(DfreError, match="order must be an integer >= 1"):
        cumulant_descriptor(x, [0, 4], -1)
    with pytest.raises(DfreError, match="structure 1 has no atoms"):
        cumulant_descriptor(x, [0, 2, 2, 4], 2)
    with pytest.raises(DfreError, match="offsets must run from 0 to the 4 feature rows"):
        cumulant_descriptor(x, [0, 3], 2)


def test_cumulant_order_study_matches_skmatter(tmp_path):
    from skmatter.metrics import global_reconstruction_error

    from dfre.descriptors.cumulants import cumulant_order_study

    rng = np.random.default_rng(9)
    counts = rng.integers(3, 20, size=80)
    store, features = make_store(tmp_path / "s.zarr", counts, dim=2)
    name = compute_cumulants(store, "toy/ll", 3)
    result = cumulant_order_study(store, name, selection="random:30", seed=1)
    assert result.names == ["phi(1)", "phi(2)", "phi(3)"]
    phi = store.descriptor(name)
    train, test = result.selection.train, result.selection.test
    assert len(test) == 30 and len(train) == 50
    for i in range(3):
        for j in range(3):
            x, y = phi[:, : 2 * (i + 1)], phi[:, : 2 * (j + 1)]
            expected = global_reconstruction_error(x, y, train_idx=train, test_idx=test)
            np.testing.assert_allclose(result.matrix[i, j], expected, rtol=1e-6, atol=1e-9)
    assert result.matrix[2, 0] < 1e-3 < 0.1 < result.matrix[0, 2]  # higher orders contain lower
    stored = Store.open(tmp_path / "s.zarr").result(f"gfre-orders-{name}")
    assert stored.attrs["config"]["study"] == "cumulant-orders"
    np.testing.assert_allclose(stored["matrix"][...], result.matrix)


def test_cumulant_order_study_lfre_matches_skmatter(tmp_path):
    pytest.importorskip("dfre.metrics.lfre")
    from skmatter.metrics import local_reconstruction_error

    from dfre.descriptors.cumulants import cumulant_order_study

    rng = np.random.default_rng(10)
    store, _ = make_store(tmp_path / "s.zarr", rng.integers(3, 20, size=70), dim=2)
    name = compute_cumulants(store, "toy/ll", 2)
    result = cumulant_order_study(store, name, metric="lfre", selection="random:20", k=12)
    phi = store.descriptor(name)
    train, test = result.selection.train, result.selection.test
    for i, j in [(0, 1), (1, 0)]:
        x, y = phi[:, : 2 * (i + 1)], phi[:, : 2 * (j + 1)]
        expected = local_reconstruction_error(x, y, 12, train_idx=train, test_idx=test)
        np.testing.assert_allclose(result.matrix[i, j], expected, rtol=1e-6, atol=1e-9)
    assert Store.open(tmp_path / "s.zarr").result(f"lfre-orders-{name}").attrs["kind"] == "lfre"


def test_cross_model_cumulants_skip_masked_structures(tmp_path):
    from skmatter.metrics import global_reconstruction_error

    from dfre.descriptors.cumulants import cross_model_cumulants

    rng = np.random.default_rng(11)
    counts = rng.integers(3, 12, size=60)
    store, features = make_store(tmp_path / "s.zarr", counts, dim=2)
    other = np.tanh(features @ rng.normal(size=(2, 3))).astype(np.float32)
    store.create_feature("other/ll", 3)[:] = other
    mask = np.zeros(store.n_atoms, bool)
    mask[store.offsets[3]] = True  # structure 3 has an atom "other" could not handle
    group = store.group["features"]["other"]
    group.create_array("_mask", shape=mask.shape, dtype="bool", chunks=mask.shape)[:] = mask
    names = [compute_cumulants(store, f, 2) for f in ("toy/ll", "other/ll")]
    result = cross_model_cumulants(store, names, selection="random:20")
    assert result.names == ["toy/ll M2", "other/ll M2"]
    train, test = result.selection.train, result.selection.test
    assert 3 not in train and 3 not in test and len(train) + len(test) == 59
    x, y = (store.descriptor(n) for n in names)
    expected = global_reconstruction_error(x, y, train_idx=train, test_idx=test)
    np.testing.assert_allclose(result.matrix[0, 1], expected, rtol=1e-6)
    config = store.result("gfre-cumulants").attrs["config"]
    assert config["study"] == "cross-model-cumulants" and config["level"] == "structure"


def test_cli_cumulants_with_studies(tmp_path, capsys):
    rng = np.random.default_rng(12)
    store, features = make_store(tmp_path / "s.zarr", rng.integers(2, 9, size=40), dim=2)
    store.create_feature("other/ll", 2)[:] = np.sin(features)
    argv = ["cumulants", "--store", str(tmp_path / "s.zarr"), "--order", "2", *LOCAL]
    assert main([*argv, "--study", "gfre", "--selection", "random:10"]) == 0
    out = capsys.readouterr().out
    assert "results/gfre-orders-cumulants-toy-ll-M2: GFRE between orders" in out
    assert "results/gfre-cumulants: GFRE between the descriptors" in out
    reopened = Store.open(tmp_path / "s.zarr")
    assert reopened.result_names() == [
        "gfre-cumulants",
        "gfre-orders-cumulants-other-ll-M2",
        "gfre-orders-cumulants-toy-ll-M2",
    ]
    assert reopened.result("gfre-cumulants")["matrix"].shape == (2, 2)


def test_cli_cumulants_bad_study_selection(tmp_path, capsys):
    make_store(tmp_path / "s.zarr", [3, 2])
    argv = ["cumulants", "--store", str(tmp_path / "s.zarr"), "--study", "gfre", *LOCAL]
    assert main([*argv, "--selection", "bogus:3"]) == 2
    assert capsys.readouterr().err.startswith("dfre: error: ")
    assert Store.open(tmp_path / "s.zarr").descriptor_names() == []


def test_unknown_device(tmp_path):
    store, _ = make_store(tmp_path / "s.zarr", [3, 2])
    with pytest.raises(DfreError, match="device must be 'cpu' or 'cuda'"):
        compute_cumulants(store, "toy/ll", 2, device="tpu")
    assert store.descriptor_names() == []
