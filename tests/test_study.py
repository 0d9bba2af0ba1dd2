"""``dfre run study.toml``: a whole study with a real model on the sample dataset, its
re-run (nothing recomputed), and one-line errors for bad study files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dfre.cli import main
from dfre.errors import DfreError
from dfre.store import Store
from dfre.studies.config import load_study, run_study

LOCAL = ["--workers", "1", "--dashboard-address", ":0"]

STUDY = """
store = "study.zarr"

[dataset]
sample_atoms = 150
seed = 3

[features]
models = ["chgnet-0.3.0"]

[[compare]]
name = "layers"
metrics = ["gfre"]
selection = "random:40"
alpha_floor = "auto"

[cumulants]
order = 2
studies = ["gfre"]
selection = "random:4"

[pcovr]

[report]
out = "report"
chemiscope = "map.json"
"""


def test_study_end_to_end_with_chgnet_and_rerun(tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(STUDY)
    assert main(["run", str(path), *LOCAL]) == 0
    out = capsys.readouterr().out
    assert "6 results, 2 descriptors" in out and "dfre run: done in " in out
    store = Store.open(tmp_path / "study.zarr")
    assert store.feature_names() == ["chgnet-0.3.0/bb", "chgnet-0.3.0/ll"]
    assert store.result_names() == [
        "gfre-cumulants",
        "gfre-layers",
        "gfre-orders-cumulants-chgnet-0.3.0-bb-M2",
        "gfre-orders-cumulants-chgnet-0.3.0-ll-M2",
        "pcovr-cumulants-chgnet-0.3.0-bb-M2",
        "pcovr-cumulants-chgnet-0.3.0-ll-M2",
    ]
    layers = store.result("gfre-layers")
    assert list(layers.attrs["names"]) == ["chgnet-0.3.0/bb", "chgnet-0.3.0/ll"]
    assert np.isfinite(layers["matrix"][...]).all() and np.isfinite(layers["error"][...]).all()
    config = layers.attrs["config"]
    assert config["solver"] == "auto" and config["alpha_floor"]["mode"] == "auto"
    assert set(config["alpha_floor"]["relative"]) == set(layers.attrs["names"])
    assert (tmp_path / "report" / "index.html").read_text().count("data:image/png") >= 10
    data = json.loads((tmp_path / "map.json").read_text())
    assert len(data["structures"]) == store.n_structures

    rerun = tmp_path / "again.toml"  # same store, dataset and models: nothing to redo
    rerun.write_text(STUDY.split("[[compare]]")[0])
    logs = []
    made = run_study(load_study(rerun), log=logs.append)
    assert logs == [f"[1/2] dataset: sample dataset of 150 atoms in {rerun.parent / 'study.zarr'}",
                    "[2/2] features: 1 models × all layers"]  # fmt: skip
    assert [(s["name"], s["computed"], s["reused"]) for s in made["stages"]] == [
        ("dataset", 0, 0),
        ("features", 0, 1),
    ]
    assert Store.open(tmp_path / "study.zarr").n_structures == store.n_structures
    assert made["results"] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dataset]\nsample_atoms = 10\n", 'needs store = "PATH"'),
        ('store = "s.zarr"\n[datasets]\n', "unknown table or key datasets"),
        ('store = "s.zarr"\n[features]\nmodel = "x"\n', "[features] has unknown key 'model'"),
        ('store = "s.zarr"\n[cumulants]\norder = "8"\n', "key 'order' must be int, got '8'"),
        ('store = "s.zarr"\n[[compare]]\nname = "a"\nmetrics = ["cka"]\n', "use gfre and/or lfre"),
        ('store = "s.zarr"\n[[compare]]\nmetrics = ["gfre"]\n', "[[compare]] number 1 needs name"),
        ('store = "s.zarr"\n[[compare]]\nname = "a"\nk = "all"\n', "k = 'all'; give a number"),
        ('store = "s.zarr"\n[compare]\nname = "a"\n', "write [[compare]]"),
        ('store = "s.zarr"\n[[compare]]\nname = "a"\nsolver = "svd"\n', "solver = 'svd'; use"),
        ('store = "s.zarr"\n[[compare]]\nname = "a"\nalpha_floor = 2.0\n', "alpha_floor = 2.0"),
        ("store = \n", "is not valid TOML"),
        ('store = "s.zarr"\n[report]\n', "does not exist and the study has no [dataset]"),
    ],
)
def test_bad_study_files(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["run", str(path), *LOCAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dfre: error: ") and message in err[-1]
    assert not (tmp_path / "s.zarr").exists()


def test_missing_study_file(tmp_path):
    with pytest.raises(DfreError, match="does not exist"):
        load_study(tmp_path / "nope.toml")
