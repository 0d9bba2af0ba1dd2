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
from PIL import Image

from dfre.cli import main
from dfre.data.selection import Selection
from dfre.descriptors.cumulants import cumulative_feature_sets, structure_cumulants
from dfre.metrics.breakdown import pointwise_breakdown
from dfre.projection.pcovr import pcovr_map
from dfre.report import figures, make_report
from dfre.store import Store

NAMES = ["m1/ll", "m1/bb", "m2/ll"]
#: Eight model names as long as the shipped ones (the demo compares eight).
LONG_MODELS = [
    "chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan", "sevennet-0", "sevennet-0-22may2024",
    "sevennet-mf-0-pbe", "sevennet-mf-0-r2scan", "sevennet-l3i5",
]  # fmt: skip
#: No figure of a report is wider or taller than this (pixels of the PNG).
MAX_PIXELS = 2400


def read_pointwise(store, run):
    """``(pointwise, element per test row, names)`` of ``results/<run>``."""
    group = store.result(run)
    rows = np.asarray(group["test_rows"][...])
    elements = np.array([chemical_symbols[z] for z in store.numbers()[rows]])
    return np.asarray(group["pointwise"][...]), elements, list(group.attrs["names"])


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
    report = make_report(store, out, min_count=1)
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
    assert "FRE between cumulant orders: GFRE of 3 feature sets — orders" in page
    assert report.skipped == []
    # settings as readable tables, every one of them as JSON in runs.json, no JSON on the page
    assert "<pre" not in page and "&quot;" not in page and '{"' not in page
    assert "<td>checkpoints.reference</td><td>run/ckpt30</td>" in page
    assert "<td>alphas</td><td>1e-09, 1</td>" in page
    settings = json.loads((out / "runs.json").read_text())
    assert settings["ckpt"]["config"]["checkpoints"]["reference"] == "run/ckpt30"
    assert set(settings) == {"gfre", "lfre", "orders", "ckpt", "pcovr"}

    cells = svg_cells(out / "gfre-gfre.svg")
    assert cells == {(i, j): f"{matrix[i, j]:.2f}" for i in range(3) for j in range(3)}


def test_report_header_says_what_was_compared_and_found(report_store, tmp_path):
    store, atoms, (matrix, pointwise) = report_store
    make_report(store, tmp_path / "r", ["gfre", "lfre"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"{store.n_structures:,} structures, {store.n_atoms:,} atoms" in page
    assert "Models and layers (dimension)" in page and "m1: bb, ll; m2: ll" in page
    assert f"explicit ({len(atoms)} test atoms) in gfre, lfre" in page
    off = matrix.copy()
    np.fill_diagonal(off, np.nan)
    as_target = np.nanmean(off, axis=0)
    best, worst = int(np.argmin(as_target)), int(np.argmax(as_target))
    assert (
        f"The others reconstruct {NAMES[best]} best (mean GFRE {as_target[best]:.3f}) "
        f"and {NAMES[worst]} worst ({as_target[worst]:.3f})."
    ) in page
    assert "Main findings" in page


def test_heatmap_cells_print_the_matrix_with_source_rows():
    matrix = np.array([[0.0, 0.512], [1.234, np.nan]])
    fig = figures.fre_heatmap(matrix, ["a", "b"], title="t", kind="gfre")
    ax = fig.axes[0]
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    assert texts == {"cell-0-0": "0.00", "cell-0-1": "0.51", "cell-1-0": "1.23", "cell-1-1": "n/a"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert ax.get_ylabel().startswith("source")
    assert ax.get_xlabel().startswith("target")


def test_heatmap_prints_uncertainties_when_given():
    matrix = np.array([[0.0, 0.512], [1.234, 0.1]])
    errors = np.array([[0.0, 0.031], [0.2, np.nan]])
    fig = figures.fre_heatmap(matrix, ["a", "b"], title="t", kind="gfre", errors=errors)
    texts = {t.get_gid(): t.get_text() for t in fig.axes[0].texts}
    assert texts == {
        "cell-0-0": "0.00\n±0.00",
        "cell-0-1": "0.51\n±0.03",
        "cell-1-0": "1.23\n±0.20",
        "cell-1-1": "0.10",
    }


def test_cka_is_drawn_as_a_symmetric_similarity():
    cka = np.array([[1.0, 0.3], [0.3, 1.0]])
    fig = figures.cka_heatmap(cka, ["a", "b"], title="CKA")
    ax, colorbar = fig.axes
    assert ax.get_xlabel() == ax.get_ylabel() == "feature set"
    assert ax.images[0].get_cmap().name == figures.SIMILARITY_CMAP != figures.ERROR_CMAP
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert "1: most similar" in colorbar.get_ylabel()
    gfre = figures.fre_heatmap(cka, ["a", "b"], title="GFRE", kind="gfre")
    assert gfre.axes[0].images[0].get_cmap().name == figures.ERROR_CMAP


def test_breakdown_cells_are_rms_of_pointwise_errors_per_group(report_store, tmp_path):
    store, atoms, (matrix, pointwise) = report_store
    make_report(store, tmp_path / "r", ["gfre"], min_count=1)
    elements = np.array([chemical_symbols[z] for z in store.numbers()[atoms]])
    groups = sorted(set(elements))
    expected = {}
    for facet, i in enumerate(range(3)):  # one facet per source, targets in name order
        targets = [j for j in range(3) if j != i]
        for g, element in enumerate(groups):
            rms = np.sqrt(np.mean(pointwise[:, :, elements == element] ** 2, axis=2))
            for c, j in enumerate(targets):
                expected[(facet, g, c)] = f"{rms[i, j]:.2f}"
    svg = (tmp_path / "r" / "gfre-gfre-per-element.svg").read_text()
    cells = re.findall(
        r'id="facet(\d+)-cell-(\d+)-(\d+)".*?<text[^>]*>([^<]*)</text>', svg, flags=re.S
    )
    assert {(int(f), int(i), int(j)): text for f, i, j, text in cells} == expected
    counts = {g: int((elements == g).sum()) for g in groups}
    page = (tmp_path / "r" / "index.html").read_text()
    for group, n in counts.items():
        assert f"{group} (n={n})" in page  # the table's columns count test environments


def test_breakdowns_leave_out_groups_below_the_minimum_count(report_store, tmp_path):
    store, atoms, _ = report_store
    elements = np.array([chemical_symbols[z] for z in store.numbers()[atoms]])
    groups, counts = np.unique(elements, return_counts=True)
    threshold = int(np.median(counts)) + 1
    make_report(store, tmp_path / "r", ["gfre"], min_count=threshold)
    svg = (tmp_path / "r" / "gfre-gfre-per-element.svg").read_text()
    page = (tmp_path / "r" / "index.html").read_text()
    for group, n in zip(groups, counts, strict=True):
        label = f"{group} (n={n})"
        assert (label in svg) == (n >= threshold), label
        if n < threshold:
            assert f"{group} ({n})" in page  # named in the caption as left out


def test_report_figures_stay_legible_for_many_feature_sets(sample_store_copy, tmp_path):
    store = Store.open(sample_store_copy, mode="r+")
    names = [f"{m}/ll" for m in LONG_MODELS]
    atoms = np.sort(np.random.default_rng(5).choice(store.n_atoms, 300, replace=False))
    write_fre_result(store, "cross", "gfre", names, atoms, store.n_atoms, seed=7)
    report = make_report(store, tmp_path / "r", min_count=5)
    for png in (p for p in report.figures if p.endswith(".png")):
        with Image.open(png) as image:
            width, height = image.size
        assert width <= MAX_PIXELS and height <= MAX_PIXELS, (png, image.size)
    made = figures.breakdown_facets(
        pointwise_breakdown(*read_pointwise(store, "cross")),
        names,
        title="GFRE per element",
        group_label="element",
        min_count=5,
    )
    panels = [ax.get_title() for fig in made for ax in fig.axes if ax.get_title()]
    assert panels == [f"from {name}" for name in names]  # one panel per source, in order


def test_no_label_is_cut_off(report_store):
    store, _, _ = report_store
    names = [f"{m}/ll" for m in LONG_MODELS]
    rng = np.random.default_rng(1)
    frame = pointwise_breakdown(
        rng.gamma(2.0, 0.2, size=(8, 8, 80)), rng.choice(["bulk", "molecules"], 80), names
    )
    made = [
        figures.fre_heatmap(rng.uniform(size=(8, 8)), names, title="GFRE (gfre)", kind="gfre"),
        figures.cka_heatmap(rng.uniform(size=(8, 8)), names, title="linear CKA"),
        *figures.breakdown_facets(frame, names, title="GFRE per subset", group_label="subset"),
        figures.pcovr_maps(
            rng.normal(size=(30, 2)),
            np.array(["bulk", "a-long-subset-name"] * 15),
            np.r_[rng.normal(size=25), [np.nan] * 5],
            title="cumulants-sevennet-mf-0-r2scan-ll-M8",
            target_label="cohesive energy (eV/atom)",
        ),
    ]
    for fig in made:
        figures.save(fig, store.path, "check")
        assert figures.clipped_texts(fig) == [], fig.axes[0].get_title()


def test_clipping_is_detected():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.5, 1.5))  # no layout engine: the long label sticks out
    ax = fig.subplots()
    ax.set_yticks([0, 1], ["a very long tick label", "b"])
    ax.set_title("title")
    assert figures.clipped_texts(fig) == ["title"]


def test_pcovr_map_has_units_and_marks_structures_without_target(report_store, tmp_path):
    store, _, _ = report_store
    make_report(store, tmp_path / "r", ["pcovr"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert "cohesive energy (eV/atom)" in page
    target = np.asarray(store.result("pcovr")["target"][...])
    missing = int((~np.isfinite(target)).sum())
    assert missing > 0
    assert f"{missing} structures without a target are grey crosses" in page
    svg = (tmp_path / "r" / "pcovr-map.svg").read_text()
    assert f"no energy ({missing})" in svg and "cohesive energy (eV/atom)" in svg


def test_a_new_report_redraws_only_changed_results(report_store, tmp_path):
    store, atoms, _ = report_store
    out = tmp_path / "r"
    make_report(store, out)
    drawn = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    make_report(store, out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == drawn
    write_fre_result(store, "lfre", "lfre", NAMES, atoms, store.n_atoms, seed=9)
    make_report(store, out)
    changed = {p.name for p in out.glob("*.png") if p.stat().st_mtime_ns != drawn[p]}
    assert changed == {"lfre-lfre.png", "lfre-lfre-per-subset.png", "lfre-lfre-per-element.png"}


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
    assert sorted(p.name for p in out.iterdir()) == [
        ".figures.json", "index.html", "pcovr-map.png", "pcovr-map.svg", "runs.json",
    ]  # fmt: skip


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
    pointwise = np.full((3, 3, 4), np.nan)
    pointwise[0, 2] = [0.1, 0.1, 0.2, 0.2]
    pointwise[1, 2] = [0.3, 0.3, 0.4, 0.4]
    frame = pointwise_breakdown(pointwise, ["g1", "g1", "g2", "g2"], ["a", "b", "c"])
    (fig,) = figures.breakdown_facets(frame, ["a", "b", "c"], title="t", group_label="subset")
    first, second = (ax for ax in fig.axes if ax.get_title().startswith("from "))
    assert [first.get_title(), second.get_title()] == ["from a", "from b"]
    assert [t.get_text() for t in first.get_xticklabels()] == ["c"]
    assert [t.get_text() for t in first.get_yticklabels()] == ["g1 (n=2)", "g2 (n=2)"]
    cells = {t.get_gid(): t.get_text() for ax in (first, second) for t in ax.texts}
    assert cells == {
        "facet0-cell-0-0": "0.10",
        "facet0-cell-1-0": "0.20",
        "facet1-cell-0-0": "0.30",
        "facet1-cell-1-0": "0.40",
    }
    left_out = figures.breakdown_facets(frame, ["a", "b", "c"], title="t", group_label="subset",
                                        min_count=3)  # fmt: skip
    assert left_out == []


def test_figures_are_drawn_on_the_cluster_workers_alike(report_store, tmp_path):
    from dfre import cluster

    store, _, _ = report_store
    here = make_report(store, tmp_path / "here", ["gfre", "pcovr"])
    with cluster.connected(n_workers=2, dashboard_address=":0", quiet=True, gpu=False):
        there = make_report(store, tmp_path / "there", ["gfre", "pcovr"])
    names = sorted(os.path.basename(p) for p in here.figures)
    assert names == sorted(os.path.basename(p) for p in there.figures) and len(names) == 10
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()
    page = (tmp_path / "there" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5


def test_report_shows_error_bars_diagnostics_flags_and_warnings(sample_store_copy, tmp_path):
    """A GFRE run of the real engine with one dominating test environment: the page shows
    value ± error in the heat map's table, the flag with the environment behind it, the
    feature sets' spectra and the sanity warning of a too large test set."""
    from dfre.data.selection import selection_for_store
    from dfre.metrics import gfre_store
    from dfre.metrics.diagnostics import describe_rows

    store = Store.open(sample_store_copy, mode="r+")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(store.n_atoms, 4)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(4, 3))).astype(np.float32)
    test = selection_for_store("random:300", store, seed=2).test
    y[test[5]] += 30.0
    store.create_feature("src/x", 4)[...] = x
    store.create_feature("tgt/y", 3)[...] = y
    result = gfre_store(store, ["src/x", "tgt/y"], "random:300", seed=2, run="flagged")
    assert result.diagnostics.warnings  # 300 of 531 atoms tested: more than half
    out = tmp_path / "report"
    make_report(store, str(out), runs=["flagged"])
    page = (out / "index.html").read_text()
    (d,) = describe_rows(store, [test[5]])
    where = f"structure {d['structure']} atom {d['atom']} ({d['element']}, {d['subset']})"
    assert "Flag: src/x → tgt/y" in page and where in page
    assert "Warning: the test set is" in page
    assert "± (bootstrap)" in page and "rank above noise" in page
    error = f"{result.error[0, 1]:.4f}"
    assert error in page
