"""Report and chemiscope export on the sample store with result groups written per the
results contract (so these tests do not depend on the GFRE/LFRE engines)."""

from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np
import pytest
from ase.data import chemical_symbols

from dfre.cli import main
from dfre.data.selection import Selection
from dfre.descriptors.cumulants import cumulative_feature_sets, structure_cumulants
from dfre.projection.pcovr import pcovr_map
from dfre.report import figures, make_report
from dfre.store import Store

NAMES = ["m1/ll", "m1/bb", "m2/ll"]


def write_fre_result(store, run, kind, names, test_rows, n_rows, *, seed, config=None):
    """A result group exactly as the results contract describes it."""
    rng = np.random.default_rng(seed)
    m = len(names)
    pointwise = rng.gamma(2.0, 0.2, size=(m, m, len(test_rows)))
    pointwise[np.arange(m), np.arange(m)] *= 0.01
    matrix = np.sqrt(np.mean(pointwise**2, axis=2))
    group = store.create_result(
        run,
        {
            "kind": kind,
            "names": list(names),
            "selection": "explicit",
            "config": {"alphas": [1e-9, 1.0], **(config or {})},
            "dfre_version": "test",
        },
    )
    arrays = {"matrix": matrix, "alpha": np.full((m, m), 1e-6), "test_rows": test_rows}
    arrays["pointwise"] = pointwise
    arrays["cka" if kind == "gfre" else "k"] = (
        rng.uniform(size=(m, m)) if kind == "gfre" else np.full((m, m), 5, dtype=np.int64)
    )
    for name, values in arrays.items():
        group.create_array(name, shape=values.shape, dtype=values.dtype)[...] = values
    train = np.setdiff1d(np.arange(n_rows), test_rows)
    Selection.explicit(train, test_rows, n_rows).save(group.create_group("selection"))
    return matrix, pointwise


@pytest.fixture
def report_store(sample_store_copy):
    store = Store.open(sample_store_copy, mode="r+")
    rng = np.random.default_rng(0)
    atoms = np.sort(rng.choice(store.n_atoms, 60, replace=False))
    gfre = write_fre_result(store, "gfre", "gfre", NAMES, atoms, store.n_atoms, seed=1)
    write_fre_result(store, "lfre", "lfre", NAMES, atoms, store.n_atoms, seed=2)
    features = rng.normal(size=(store.n_atoms, 4))
    phi = structure_cumulants(features, store.offsets, 3)
    store.write_descriptor("cumulants-toy-ll-M3", phi)
    orders = list(cumulative_feature_sets(phi, 4))
    write_fre_result(
        store,
        "orders",
        "gfre",
        orders,
        np.arange(0, store.n_structures, 2),
        store.n_structures,
        seed=3,
        config={"study": "cumulant-orders", "level": "structure"},
    )
    ckpt = [f"run/ckpt{e}" for e in (0, 10, 20, 30)]
    checkpoints = {"epochs": [0, 10, 20, 30], "reference": "run/ckpt30"}
    write_fre_result(
        store,
        "ckpt",
        "gfre",
        ckpt,
        atoms,
        store.n_atoms,
        seed=4,
        config={"checkpoints": checkpoints},
    )
    pcovr_map(store, "cumulants-toy-ll-M3", run="pcovr")
    return store, atoms, gfre


def svg_cells(path):
    """``{(i, j): text}`` of the annotated cells of a heat map SVG."""
    with open(path) as fh:
        svg = fh.read()
    cells = re.findall(r'id="cell-(\d+)-(\d+)".*?<text[^>]*>([^<]*)</text>', svg, flags=re.S)
    return {(int(i), int(j)): text for i, j, text in cells}


def test_report_writes_every_figure_and_one_html(report_store, tmp_path):
    store, atoms, (matrix, pointwise) = report_store
    out = tmp_path / "report"
    report = make_report(store, out)
    stems = {os.path.splitext(os.path.basename(p))[0] for p in report.figures}
    assert stems == {
        "gfre-gfre", "gfre-cka", "gfre-gfre-per-subset", "gfre-gfre-per-element",
        "lfre-lfre", "lfre-lfre-per-subset", "lfre-lfre-per-element",
        "orders-gfre", "orders-cka", "orders-gfre-per-subset",
        "ckpt-gfre", "ckpt-cka", "ckpt-gfre-per-subset", "ckpt-gfre-per-element",
        "pcovr-map", "checkpoints",
    }  # fmt: skip
    for stem in stems:
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(stems)
    assert "FRE between cumulant orders: GFRE — orders" in page
    assert "cumulant-orders" in page and "&quot;reference&quot;: &quot;run/ckpt30&quot;" in page
    assert report.skipped == []

    cells = svg_cells(out / "gfre-gfre.svg")
    assert cells == {(i, j): f"{matrix[i, j]:.2f}" for i in range(3) for j in range(3)}


def test_heatmap_cells_print_the_matrix_with_source_rows():
    matrix = np.array([[0.0, 0.512], [1.234, np.nan]])
    fig = figures.fre_heatmap(matrix, ["a", "b"], title="t", kind="gfre")
    ax = fig.axes[0]
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    assert texts == {"cell-0-0": "0.00", "cell-0-1": "0.51", "cell-1-0": "1.23", "cell-1-1": "n/a"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert ax.get_ylabel().startswith("source")
    assert ax.get_xlabel().startswith("target")


def test_breakdown_cells_are_rms_of_pointwise_errors_per_group(report_store, tmp_path):
    store, atoms, (matrix, pointwise) = report_store
    make_report(store, tmp_path / "r", ["gfre"])
    elements = np.array([chemical_symbols[z] for z in store.numbers()[atoms]])
    groups = sorted(set(elements))
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected = {}
    for g, element in enumerate(groups):
        rms = np.sqrt(np.mean(pointwise[:, :, elements == element] ** 2, axis=2))
        for c, (i, j) in enumerate(pairs):
            expected[(g, c)] = f"{rms[i, j]:.2f}"
    assert svg_cells(tmp_path / "r" / "gfre-gfre-per-element.svg") == expected


def test_checkpoint_curves_follow_the_reference_column(report_store):
    store, _, _ = report_store
    matrix = np.asarray(store.result("ckpt")["matrix"][...])
    fig = figures.checkpoint_curves(
        [{"label": "ckpt", "x": [0, 10, 20, 30], "y": matrix[:, 3].tolist()}], title="t"
    )
    line = fig.axes[0].lines[0]
    np.testing.assert_allclose(line.get_ydata(), matrix[:, 3])
    np.testing.assert_allclose(line.get_xdata(), [0, 10, 20, 30])


def test_cli_report_selected_runs(report_store, tmp_path, capsys):
    store, _, _ = report_store
    out = tmp_path / "only"
    assert main(["report", "--store", store.path, "--out", str(out), "--run", "pcovr"]) == 0
    assert "1 figures" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "pcovr-map.png", "pcovr-map.svg"]


def test_report_bad_input(report_store, sample_store, tmp_path, capsys):
    store, _, _ = report_store
    argv = ["report", "--store", store.path, "--out", str(tmp_path / "r")]
    assert main([*argv, "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfre: error: store") and "has no results 'nope'" in err
    assert not (tmp_path / "r").exists()
    assert main(["report", "--store", sample_store, "--out", str(tmp_path / "r")]) == 2
    assert "has no results: run `dfre gfre`" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["report", "--store", store.path, "--out", str(tmp_path / "file")]) == 2
    assert "is a file: give a directory" in capsys.readouterr().err


def test_chemiscope_export(report_store, tmp_path, capsys):
    store, _, _ = report_store
    path = tmp_path / "map.json.gz"
    assert main(["export-chemiscope", "--store", store.path, "--out", str(path)]) == 0
    assert "27 structures, 8 properties, maps: pcovr" in capsys.readouterr().out
    with gzip.open(path) as fh:
        data = json.load(fh)
    assert len(data["structures"]) == store.n_structures == 27
    assert sorted(data["properties"]) == sorted(
        ["n_atoms", "energy", "frame", "source", "subset", "pcovr[1]", "pcovr[2]", "pcovr target"]
    )
    coordinates = np.asarray(store.result("pcovr")["coordinates"][...])
    np.testing.assert_allclose(data["properties"]["pcovr[2]"]["values"], coordinates[:, 1])
    assert data["properties"]["subset"]["values"] == list(store.subsets())
    assert data["settings"]["map"]["x"] == {"property": "pcovr[1]"}
    assert [len(s["x"]) for s in data["structures"]] == store.counts.tolist()

    small = tmp_path / "small.json"
    argv = ["export-chemiscope", "--store", store.path, "--out", str(small)]
    assert main([*argv, "--max-structures", "5"]) == 0
    data = json.loads(small.read_text())
    assert len(data["structures"]) == 5
    assert all(len(p["values"]) == 5 for p in data["properties"].values())


def test_chemiscope_bad_input(report_store, tmp_path, capsys):
    store, _, _ = report_store
    argv = ["export-chemiscope", "--store", store.path]
    assert main([*argv, "--out", str(tmp_path / "x.json"), "--map", "gfre"]) == 2
    assert "results/gfre is not a PCovR map" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "nope" / "x.json")]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_unfinished_results_are_listed_not_drawn(report_store, tmp_path, capsys):
    store, _, _ = report_store
    store.create_result("partial")  # e.g. a write interrupted before its attributes
    argv = ["report", "--store", store.path, "--out", str(tmp_path / "r"), "--run", "partial"]
    assert main(argv) == 0
    assert "results/partial has no known kind" in capsys.readouterr().err
    assert "results without a known kind" in (tmp_path / "r" / "index.html").read_text()


def test_breakdown_leaves_out_pairs_not_computed():
    from dfre.metrics.breakdown import pointwise_breakdown

    pointwise = np.full((3, 3, 4), np.nan)
    pointwise[0, 2] = [0.1, 0.1, 0.2, 0.2]
    pointwise[1, 2] = [0.3, 0.3, 0.4, 0.4]
    frame = pointwise_breakdown(pointwise, ["g1", "g1", "g2", "g2"], ["a", "b", "c"])
    fig = figures.breakdown_heatmap(frame, ["a", "b", "c"], title="t", group_label="subset")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a → c", "b → c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["g1", "g2"]
    assert {t.get_gid(): t.get_text() for t in ax.texts} == {
        "cell-0-0": "0.10",
        "cell-1-0": "0.20",
        "cell-0-1": "0.30",
        "cell-1-1": "0.40",
    }
