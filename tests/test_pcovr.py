"""PCovR maps: identical to scikit-matter's PCovR on the same scaled inputs, cohesive
energies from least-squares reference energies, projection of a second store, and bad
input."""

from __future__ import annotations

import numpy as np
import pytest
from skmatter.decomposition import PCovR
from skmatter.preprocessing import StandardFlexibleScaler

from dfre.cli import main
from dfre.errors import DfreError
from dfre.projection.pcovr import (
    cohesive_energy_per_atom,
    composition_counts,
    fit_pcovr,
    pcovr_map,
)
from dfre.store import Store, StructureBlock

REFERENCES = {1: -3.4, 8: -7.9, 14: -5.4}


def make_store(path, n_structures, seed, *, energies=True, dim=6):
    """Structures of H, O, Si with energies = references + a per-atom cohesive part."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 9, size=n_structures)
    numbers = rng.choice(list(REFERENCES), size=int(counts.sum())).astype(np.int16)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    descriptor = rng.normal(size=(n_structures, dim))
    cohesive = descriptor @ rng.normal(size=dim) * 0.1
    energy = [
        sum(REFERENCES[int(z)] for z in numbers[offsets[s] : offsets[s + 1]])
        + counts[s] * cohesive[s]
        for s in range(n_structures)
    ]
    info = {"subset": [f"set{s % 3}" for s in range(n_structures)], "volume": list(cohesive * 3)}
    if energies:
        info["energy"] = energy
    store = Store.create(path)
    store.append(
        StructureBlock(
            numbers=numbers,
            positions=rng.normal(size=(len(numbers), 3)),
            counts=counts,
            cell=np.zeros((n_structures, 3, 3)),
            pbc=np.zeros((n_structures, 3), bool),
            info=info,
        )
    )
    store.write_descriptor("desc", descriptor)
    return store, descriptor, np.asarray(energy)


def skmatter_map(x, y):
    xs = StandardFlexibleScaler(column_wise=False).fit(x)
    ys = StandardFlexibleScaler(column_wise=True).fit(y[:, None])
    model = PCovR(mixing=0.5, n_components=2).fit(xs.transform(x), ys.transform(y[:, None]))
    return lambda other: model.transform(xs.transform(other))


def test_fit_equals_skmatter_and_skips_nan_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5)) * [1, 10, 0.1, 3, 1]
    y = x @ rng.normal(size=5) + rng.normal(size=80)
    x[[3, 50]] = np.nan
    fitted = fit_pcovr(x, y)
    keep = np.isfinite(x).all(axis=1)
    expected = skmatter_map(x[keep], y[keep])(x[keep])
    coordinates = fitted.transform(x)
    np.testing.assert_allclose(coordinates[keep], expected, atol=1e-10)
    assert np.isnan(coordinates[~keep]).all()
    assert fitted.config == {"mixing": 0.5, "n_components": 2, "n_fit": 78}


def test_cohesive_energy_is_the_papers_ridgecv_baseline():
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(1)
    numbers = rng.choice([1, 8, 14], size=60)
    offsets = np.array([0, 4, 10, 17, 25, 31, 40, 52, 60])
    counts, elements = composition_counts(numbers, offsets)
    assert counts.sum() == 60 and list(elements) == [1, 8, 14]
    exact = counts @ [REFERENCES[z] for z in elements] + 0.7
    cohesive, references, intercept = cohesive_energy_per_atom(exact, numbers, offsets)
    assert references == pytest.approx(REFERENCES, abs=1e-5)  # alpha 1e-8 wins the CV
    assert intercept == pytest.approx(0.7, abs=1e-4)
    np.testing.assert_allclose(cohesive, 0.0, atol=1e-5)  # the ridge bias of alpha 1e-8
    noisy = exact + rng.normal(size=8)
    noisy[2] = np.nan
    cohesive, references, intercept = cohesive_energy_per_atom(noisy, numbers, offsets)
    known = np.isfinite(noisy)
    ridge = RidgeCV(alphas=np.geomspace(1e-8, 1e2, 20)).fit(counts[known], noisy[known])
    want = (noisy - ridge.predict(counts)) / np.diff(offsets)
    np.testing.assert_allclose(cohesive[known], want[known], rtol=1e-12)
    assert intercept == pytest.approx(ridge.intercept_)
    assert np.isnan(cohesive[2])


def test_pcovr_map_writes_results_and_projects_a_second_store(tmp_path):
    store_a, x_a, energy_a = make_store(tmp_path / "a.zarr", 40, seed=2)
    store_b, x_b, _ = make_store(tmp_path / "b.zarr", 15, seed=3)
    fitted = pcovr_map(store_a, "desc", project_into=[store_b])
    cohesive_a, refs, _ = cohesive_energy_per_atom(energy_a, store_a.numbers(), store_a.offsets)
    reference = skmatter_map(x_a, cohesive_a)

    result_a = Store.open(tmp_path / "a.zarr").result("pcovr-desc")
    assert result_a.attrs["kind"] == "pcovr" and result_a.attrs["target"] == "cohesive_energy"
    assert result_a.attrs["config"]["reference_energies"] == {str(z): e for z, e in refs.items()}
    np.testing.assert_allclose(result_a["coordinates"][...], reference(x_a), atol=1e-10)
    np.testing.assert_allclose(result_a["target"][...], cohesive_a, atol=1e-12)
    assert result_a["fit_rows"][...].all()

    result_b = Store.open(tmp_path / "b.zarr").result("pcovr-desc")
    assert result_b.attrs["fitted_on"] == str(tmp_path / "a.zarr")
    np.testing.assert_allclose(result_b["coordinates"][...], reference(x_b), atol=1e-10)
    np.testing.assert_allclose(result_b["reference_coordinates"][...], reference(x_a), atol=1e-10)
    assert not result_b["fit_rows"][...].any()
    assert fitted.config["n_fit"] == 40


def test_info_key_target(tmp_path):
    store, x, _ = make_store(tmp_path / "a.zarr", 30, seed=4, energies=False)
    pcovr_map(store, "desc", target="volume", run="by-volume")
    result = store.result("by-volume")
    volume = store.info("volume")
    np.testing.assert_allclose(result["coordinates"][...], skmatter_map(x, volume)(x), atol=1e-10)


def test_cli_pcovr(tmp_path, capsys):
    make_store(tmp_path / "a.zarr", 20, seed=5)
    make_store(tmp_path / "b.zarr", 10, seed=6)
    argv = ["pcovr", "--store", str(tmp_path / "a.zarr"), "--descriptor", "desc"]
    assert main([*argv, "--project", str(tmp_path / "b.zarr"), "--run", "map"]) == 0
    assert "results/map: PCovR of desc on 20 structures" in capsys.readouterr().out
    assert Store.open(tmp_path / "b.zarr").result("map")["coordinates"].shape == (10, 2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "has no energies (structure info 'energy') for the cohesive-energy target"),
        (["--target", "nope"], "has no structure info 'nope' to use as PCovR target"),
        (["--descriptor", "missing"], "has no descriptor 'missing'"),
        (["--mixing", "1.5"], "--mixing must lie in [0, 1]"),
    ],
)
def test_cli_pcovr_bad_input(tmp_path, capsys, extra, message):
    make_store(tmp_path / "a.zarr", 12, seed=7, energies=False)
    argv = ["pcovr", "--store", str(tmp_path / "a.zarr"), "--descriptor", "desc", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfre: error: ") and message in err and err.count("\n") == 1
    assert Store.open(tmp_path / "a.zarr").result_names() == []


def test_projection_needs_same_width():
    fitted = fit_pcovr(np.random.default_rng(8).normal(size=(20, 4)), np.arange(20.0))
    with pytest.raises(DfreError, match=r"shape \(3, 5\).*fitted on 4 columns"):
        fitted.transform(np.zeros((3, 5)))


def test_fit_on_a_random_subset_projects_every_structure(tmp_path):
    store, x, energy = make_store(tmp_path / "a.zarr", 40, seed=9)
    pcovr_map(store, "desc", max_fit=15, seed=2, run="sub")
    result = store.result("sub")
    fit_rows = result["fit_rows"][...]
    assert fit_rows.sum() == 15 and result.attrs["config"]["n_fit"] == 15
    cohesive, _, _ = cohesive_energy_per_atom(energy, store.numbers(), store.offsets)
    expected = skmatter_map(x[fit_rows], cohesive[fit_rows])(x)
    np.testing.assert_allclose(result["coordinates"][...], expected, atol=1e-10)


def test_outlier_removal_drops_isolation_forest_outliers_from_the_fit(tmp_path):
    from sklearn.ensemble import IsolationForest

    store, x, energy = make_store(tmp_path / "a.zarr", 60, seed=10)
    x = x.copy()
    x[11] = 40.0  # one structure far from all others
    store.write_descriptor("odd", x)
    pcovr_map(store, "odd", run="clean", remove_outliers=True)
    result = store.result("clean")
    scaled = StandardFlexibleScaler(column_wise=False).fit_transform(x)
    flagged = IsolationForest(contamination=1e-4, random_state=42).fit_predict(scaled) == -1
    np.testing.assert_array_equal(result["outliers"][...], flagged)
    assert flagged[11] and result.attrs["config"]["n_outliers"] == int(flagged.sum())
    fit_rows = result["fit_rows"][...]
    assert not fit_rows[flagged].any() and fit_rows[~flagged].all()
    cohesive, _, _ = cohesive_energy_per_atom(energy, store.numbers(), store.offsets)
    expected = skmatter_map(x[~flagged], cohesive[~flagged])(x)  # still projected
    np.testing.assert_allclose(result["coordinates"][...], expected, atol=1e-10)
    assert result.attrs["config"]["target_units"] == "eV/atom"
