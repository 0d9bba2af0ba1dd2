"""``dfre demo``: the embedded study end to end at a tiny size with two CHGNet models, its
resumable re-run, the resolution of the embedded study file, and one-line errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from dfre.cli import main
from dfre.data.sample import sample_structures, write_sample
from dfre.data.selection import make_selection
from dfre.metrics.diagnostics import selection_warnings
from dfre.models.base import get_spec
from dfre.store import Store
from dfre.studies.config import load_study
from dfre.studies.demo import demo_models, resolve_demo_study, run_demo, write_demo_study

LOCAL = ["--workers", "1", "--dashboard-address", ":0"]
MODELS = ["chgnet-0.3.0", "chgnet-r2scan"]


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    store_path, out = tmp_path / "demo.zarr", tmp_path / "report"
    args = ["demo", "--atoms", "200", "--models", ",".join(MODELS)]
    assert main([*args, "--store", str(store_path), "--out", str(out), *LOCAL]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"report: {out / 'index.html'}" in printed
    assert f"dfre run {out / 'study.toml'}" in printed

    store = Store.open(store_path)
    assert store.n_atoms >= 200
    assert store.feature_names() == [f"{m}/{layer}" for m in MODELS for layer in ("bb", "ll")]
    expected = {
        "gfre-cross-model",
        "lfre-cross-model",
        "gfre-fine-tune",
        "lfre-fine-tune",
        "gfre-backbone-vs-last-layer",
        "gfre-orders-cumulants-chgnet-0.3.0-ll-M8",
        "pcovr-cumulants-chgnet-0.3.0-ll-M8",
    }
    assert set(store.result_names()) == expected  # "variants" needs two of its models
    for run in expected - {"pcovr-cumulants-chgnet-0.3.0-ll-M8"}:
        matrix = np.asarray(store.result(run)["matrix"][...])
        assert np.isfinite(matrix).all(), run
        if "cumulants" not in run:  # ~10 structures are too few for the structure level
            assert np.allclose(np.diag(matrix), 0, atol=0.05), run  # a set rebuilds itself
    cross = store.result("gfre-cross-model")
    assert list(cross.attrs["names"]) == [f"{m}/ll" for m in MODELS]
    assert cross.attrs["selection"] == "stratified:50"  # capped at a quarter of the atoms
    off_diagonal = np.asarray(cross["matrix"][...])[[0, 1], [1, 0]]
    assert (off_diagonal > 0.01).all()  # two different models
    pcovr = store.result("pcovr-cumulants-chgnet-0.3.0-ll-M8")
    assert np.isfinite(pcovr["coordinates"][...]).all()
    html = (out / "index.html").read_text()
    assert html.count("data:image/png") >= 10
    assert (out / "gfre-cross-model-gfre.png").stat().st_size > 1000
    assert os.path.normpath(load_study(out / "study.toml").store) == str(store_path)

    # timestamped stage lines as the stages start, a closing summary of what ran
    assert re.search(r"^\d\d:\d\d:\d\d dfre demo: \[1/8\] dataset: ", captured.err, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d dfre demo: \[8/8\] report: ", captured.err, re.M)
    assert "dfre demo: done in " in printed and "masked: " in printed
    assert re.search(r"^  compare cross-model +[\d.]+ s .*2 computed", printed, re.M)
    assert "CHGNet" not in captured.out + captured.err  # the model's own messages stay quiet

    # Re-run on the same store: everything is up to date, no cluster starts, only the
    # report is written.
    logs: list[str] = []
    started = []
    made = run_demo(
        store_path, out, atoms=200, models=MODELS, log=logs.append,
        cluster=lambda: started.append(True),
    )  # fmt: skip
    assert started == []
    assert [line.split(":")[0] for line in logs] == [
        "[1/8] dataset", "[2/8] features", "[3/8] compare cross-model", "[4/8] compare fine-tune",
        "[5/8] compare backbone-vs-last-layer", "[6/8] cumulants", "[7/8] pcovr", "[8/8] report",
    ]  # fmt: skip
    stages = {s["name"]: s for s in made["stages"]}
    assert all(s["computed"] == 0 for s in stages.values())
    assert stages["features"]["reused"] == 2 and stages["compare cross-model"]["reused"] == 2
    assert set(made["results"]) == expected
    again = np.asarray(Store.open(store_path).result("gfre-cross-model")["matrix"][...])
    np.testing.assert_allclose(again, np.asarray(cross["matrix"][...]), rtol=1e-6, atol=1e-9)


def test_embedded_study_resolves_for_every_model(tmp_path):
    path = write_demo_study(tmp_path / "s.zarr", tmp_path / "out", atoms=4000)
    study = load_study(path)
    assert os.path.normpath(study.store) == str(tmp_path / "s.zarr")
    assert study.get("features")["models"] == demo_models()
    assert len(demo_models()) == 8
    names = {c["name"]: c for c in study.get("compare")}
    assert list(names) == ["cross-model", "variants", "fine-tune", "backbone-vs-last-layer"]
    assert len(names["cross-model"]["features"]) == 8
    assert names["cross-model"]["selection"] == "stratified:500"  # not capped at 4000 atoms
    assert study.get("cumulants")["features"] == ["chgnet-0.3.0/ll", "sevennet-0/ll"]


def test_model_subset_keeps_only_comparisons_with_two_feature_sets():
    data = resolve_demo_study(atoms=1000, models=["sevennet-0", "sevennet-l3i5"])
    assert [c["name"] for c in data["compare"]] == [
        "cross-model",
        "variants",
        "backbone-vs-last-layer",
    ]
    assert data["compare"][2]["features"] == ["sevennet-0/bb", "sevennet-0/ll"]
    assert all(c["selection"] == "stratified:250" for c in data["compare"])
    single = resolve_demo_study(atoms=1000, models=["chgnet-r2scan"])
    assert [c["name"] for c in single["compare"]] == ["backbone-vs-last-layer"]
    assert single["cumulants"]["features"] == ["chgnet-r2scan/ll"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "chgnet-0.3.0,mace"], "--models: mace not in the demo; choose from"),
        (["--models", "chgnet-0.3.0,chgnet-0.3.0"], "--models repeats a model"),
        (["--atoms", "20"], "--atoms 20 is too small for the demo"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    store = tmp_path / "demo.zarr"
    code = main(["demo", *args, "--store", str(store), "--out", str(tmp_path / "r"), *LOCAL])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dfre: error: ") and message in err[-1]
    assert not store.exists()


def test_store_with_other_data_is_refused_untouched(tmp_path, capsys):
    store = tmp_path / "other.zarr"
    write_sample(store, 160, seed=5)
    before = Store.open(store).summary()
    code = main(["demo", "--atoms", "200", "--store", str(store), "--out", str(tmp_path), *LOCAL])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"dfre: error: store {store} holds dfre sample seed=5 atoms=160")
    assert "give the same --atoms as when it was made, or a new --store" in err
    assert Store.open(store).summary() == before


def test_default_demo_gives_its_cumulant_study_enough_structures():
    """The default demo trips no sanity warning in its cumulant study: every fold trains
    on at least as many structures as the descriptor has columns (issue: order 8 over
    about 100 structures reconstructed itself with an error of 0.11)."""
    data = resolve_demo_study()
    dataset, cumulants = data["dataset"], data["cumulants"]
    frames = sample_structures(
        dataset["sample_atoms"], dataset["seed"], energies=False, subsets=dataset["subsets"]
    )
    n_structures = sum(1 for _ in frames)
    names = [f"{name} M{cumulants['order']}" for name in cumulants["features"]]
    dims = [
        cumulants["order"] * get_spec(name.split("/")[0]).layers[name.split("/")[1]].dim
        for name in cumulants["features"]
    ]
    for n in (n_structures, n_structures - 5):  # 5 structures are masked for SevenNet-0
        selection = make_selection(cumulants["selection"], n, seed=0)
        assert selection_warnings(names, dims, selection.folds, range(len(names))) == []
    assert n_structures > 1024
