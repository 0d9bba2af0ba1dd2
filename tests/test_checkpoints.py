"""Checkpoint trajectories (Fig. 6): FRE of each checkpoint against the final one, equal to
scikit-matter on the same rows, converging to 0 for features that converge."""

from __future__ import annotations

import numpy as np
import pytest
from skmatter.metrics import global_reconstruction_error, local_reconstruction_error

from dfre.cli import main
from dfre.errors import DfreError
from dfre.report import make_report
from dfre.store import Store
from dfre.studies import checkpoint_trajectory

EPOCHS = [0, 10, 50, 200]
LOCAL = ["--workers", "1", "--dashboard-address", ":0"]


@pytest.fixture
def trajectory_store(sample_store_copy):
    """Checkpoint features drifting towards the final ones: x_t = f + w_t * g(f)."""
    store = Store.open(sample_store_copy, mode="r+")
    rng = np.random.default_rng(0)
    n = store.n_atoms
    final = rng.normal(size=(n, 6))
    nonlinear = np.tanh(final @ rng.normal(size=(6, 6))) + 0.3 * rng.normal(size=(n, 6))
    weights = [1.0, 0.5, 0.1, 0.0]
    names = []
    for epoch, weight in zip(EPOCHS, weights, strict=True):
        name = f"toy-e{epoch}/ll"
        store.create_feature(name, 6)[:] = (final + weight * nonlinear).astype(np.float32)
        names.append(name)
    return store, names


def test_gfre_trajectory_equals_skmatter_and_converges(trajectory_store):
    store, names = trajectory_store
    result = checkpoint_trajectory(store, names, epochs=EPOCHS, selection="random:150")
    curve = result.matrix[:, 3]
    train, test = result.selection.train, result.selection.test
    final = np.asarray(store.features(names[-1]))
    for t, name in enumerate(names):
        x = np.asarray(store.features(name))
        expected = global_reconstruction_error(x, final, train_idx=train, test_idx=test)
        np.testing.assert_allclose(curve[t], expected, rtol=1e-6, atol=1e-6)
    assert curve[0] > curve[1] > curve[2] > curve[3] and curve[3] < 1e-3
    assert np.isnan(result.matrix[:, :3]).all()  # only the pairs to the reference
    attrs = store.result("gfre-checkpoints").attrs
    assert attrs["config"]["checkpoints"] == {
        "epochs": [float(e) for e in EPOCHS],
        "reference": names[-1],
        "x_label": "epoch",
    }


def test_lfre_trajectory_equals_skmatter(trajectory_store):
    store, names = trajectory_store
    result = checkpoint_trajectory(
        store, names[:2] + names[-1:], metric="lfre", selection="random:40", k=15
    )
    train, test = result.selection.train, result.selection.test
    final = np.asarray(store.features(names[-1]))
    x = np.asarray(store.features(names[0]))
    expected = local_reconstruction_error(x, final, 15, train_idx=train, test_idx=test)
    np.testing.assert_allclose(result.matrix[0, 2], expected, rtol=1e-6)


def test_cli_checkpoints_and_report_curves(trajectory_store, tmp_path, capsys):
    store, names = trajectory_store
    argv = ["checkpoints", "--store", store.path, "--features", *names, *LOCAL]
    argv += ["--epochs", *map(str, EPOCHS), "--metric", "gfre", "--selection", "random:100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "results/gfre-checkpoints: GFRE(checkpoint -> reference)" in out
    assert f"  {names[-1]}: 0.0000" in out
    report = make_report(Store.open(store.path), tmp_path / "r", ["gfre-checkpoints"])
    assert any(p.endswith("checkpoints.svg") for p in report.figures)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["toy-e0/ll"]}, "needs at least two feature sets"),
        ({"epochs": [1, 2]}, "2 epochs given for 4 checkpoints"),
        ({"reference": "nope/ll"}, "reference nope/ll is not one of the checkpoints"),
        ({"metric": "cka"}, "metric must be 'gfre' or 'lfre'"),
    ],
)
def test_bad_input(trajectory_store, kwargs, message):
    store, names = trajectory_store
    kwargs = {"names": names, **kwargs}
    with pytest.raises(DfreError, match=message):
        checkpoint_trajectory(store, kwargs.pop("names"), **kwargs)
    assert "gfre-checkpoints" not in store.result_names()
