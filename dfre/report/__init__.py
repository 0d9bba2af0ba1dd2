"""Reports of a store's results: figures (PNG and SVG), one HTML page, chemiscope export.

:func:`make_report` turns every ``results/<run>`` of a store into figures:

- ``kind`` ``gfre`` / ``lfre``: the matrix as a heat map (row = source, column = target,
  values in cells); for GFRE also the CKA matrix; with ``pointwise`` and ``test_rows``,
  the errors per subset and (for atom-level results) per element of the test rows.
  Results of the studies of :mod:`dfre.descriptors.cumulants` (``config["study"]``
  ``cumulant-orders``, ``cross-model-cumulants``) are titled as such;
- ``kind`` ``pcovr``: the map coloured by subset and by target (the fitting store in
  grey when the map was fitted on another store);
- results whose ``config["checkpoints"]`` is ``{"epochs": [...], "reference": NAME}``
  (one epoch per feature set of ``names``): FRE of each checkpoint against the reference,
  as curves.

Rows of ``test_rows`` are atom rows unless ``config["level"] == "structure"`` or every
feature set of the result is a descriptor of the store (structure rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfre.errors import DfreError

FRE_KINDS = ("gfre", "lfre")
#: Section title prefixes of known studies (``config["study"]`` of a result).
STUDY_TITLES = {
    "cumulant-orders": "FRE between cumulant orders: ",
    "cross-model-cumulants": "FRE between cumulant descriptors of models: ",
    "checkpoints": "FRE along training checkpoints: ",
}


@dataclass
class Report:
    """What :func:`make_report` wrote."""

    html: str
    figures: list[str]
    skipped: list[str]


def make_report(store: Any, out_dir: str | os.PathLike, runs: list[str] | None = None) -> Report:
    """Write figures of the results ``runs`` (default: all) and ``index.html`` to ``out_dir``."""
    from dfre.metrics.breakdown import pointwise_breakdown
    from dfre.report import figures as fig
    from dfre.report.html import FigureFile, Section, render_html

    available = store.result_names()
    if not available:
        raise DfreError(
            f"store {store.path} has no results: run `dfre gfre`, `dfre lfre` or `dfre pcovr` first"
        )
    runs = list(runs or available)
    groups = {run: store.result(run) for run in runs}  # unknown runs fail before writing
    out_dir = os.fspath(out_dir)
    if os.path.isfile(out_dir):
        raise DfreError(f"report folder {out_dir} is a file: give a directory")
    os.makedirs(out_dir, exist_ok=True)
    context = _StoreContext(store)
    sections, written, skipped, curves = [], [], [], []

    def add(section: Section, figure, stem: str, caption: str) -> None:
        paths = fig.save(figure, out_dir, stem)
        section.figures.append(FigureFile(caption, paths["png"], paths["svg"]))
        written.extend(paths.values())

    for run, group in groups.items():
        attrs = dict(group.attrs)
        kind = attrs.get("kind")
        config = attrs.get("config") or {}
        if kind in FRE_KINDS:
            names = list(attrs["names"])
            label = kind.upper()
            study = STUDY_TITLES.get(config.get("study"), "")
            section = Section(f"{study}{label} — {run}", config=attrs)
            matrix = np.asarray(group["matrix"][...])
            add(
                section,
                fig.fre_heatmap(matrix, names, title=f"{label} ({run})", kind=kind),
                f"{run}-{kind}",
                f"{label} matrix, source rows → target columns",
            )
            if "cka" in group.array_keys():
                cka = np.asarray(group["cka"][...])
                add(
                    section,
                    fig.heatmap(cka, names, names, title=f"CKA ({run})", colorbar_label="CKA"),
                    f"{run}-cka",
                    "linear CKA of the same pairs",
                )
            if {"pointwise", "test_rows"} <= set(group.array_keys()):
                pointwise = np.asarray(group["pointwise"][...])
                test_rows = np.asarray(group["test_rows"][...])
                level = context.level(names, config)
                for by, labels in context.breakdowns(test_rows, level):
                    frame = pointwise_breakdown(pointwise, labels, names)
                    title = f"{label} per {by} ({run})"
                    add(
                        section,
                        fig.breakdown_heatmap(
                            frame, names, title=title, group_label=by, colorbar_label=label
                        ),
                        f"{run}-{kind}-per-{by}",
                        f"{label} of the test rows of each {by}",
                    )
            if isinstance(config.get("checkpoints"), dict):
                curves.append(_checkpoint_series(run, kind, names, matrix, config["checkpoints"]))
            sections.append(section)
        elif kind == "pcovr":
            section = Section(f"PCovR map — {run}", config=attrs)
            coordinates = np.asarray(group["coordinates"][...])
            target = np.asarray(group["target"][...])
            reference = (
                np.asarray(group["reference_coordinates"][...])
                if "reference_coordinates" in group.array_keys()
                else None
            )
            figure = fig.pcovr_maps(
                coordinates,
                store.subsets(),
                target,
                title=attrs.get("descriptor", run),
                target_label=str(attrs.get("target", "target")),
                reference=reference,
            )
            add(section, figure, f"{run}-map", "PCovR map by subset and by target")
            sections.append(section)
        else:
            skipped.append(run)
    if curves:
        section = Section("FRE along training checkpoints")
        add(
            section,
            fig.checkpoint_curves(curves, title="FRE vs checkpoint"),
            "checkpoints",
            "error of each checkpoint's features against the reference checkpoint",
        )
        sections.insert(0, section)
    if skipped:
        note = Section(
            "Not shown",
            notes=[
                f"results without a known kind (unfinished or other analyses): {', '.join(skipped)}"
            ],
        )
        sections.append(note)
    page = render_html(
        f"dfre report — {store.path}",
        sections,
        preamble={
            "store": str(store.path),
            "n_structures": store.n_structures,
            "n_atoms": store.n_atoms,
            "results": runs,
        },
    )
    html_path = os.path.join(out_dir, "index.html")
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return Report(html_path, written, skipped)


def _checkpoint_series(run: str, kind: str, names: list[str], matrix: np.ndarray, spec: dict):
    reference = spec.get("reference", names[-1])
    if reference not in names:
        raise DfreError(
            f"results/{run}: checkpoint reference '{reference}' is not one of its names"
        )
    epochs = list(spec.get("epochs") or range(len(names)))
    if len(epochs) != len(names):
        raise DfreError(f"results/{run}: {len(epochs)} checkpoint epochs for {len(names)} names")
    column = names.index(reference)
    return {
        "label": f"{run} ({kind.upper()})",
        "x": epochs,
        "y": matrix[:, column].tolist(),
        "x_label": spec.get("x_label", "epoch"),
    }


class _StoreContext:
    """Per-row labels of the store, read once."""

    def __init__(self, store: Any):
        self.store = store
        self._subsets: np.ndarray | None = None

    @property
    def subsets(self) -> np.ndarray:
        if self._subsets is None:
            self._subsets = np.asarray(self.store.subsets()).astype(str)
        return self._subsets

    def level(self, names: list[str], config: dict) -> str:
        if config.get("level") in ("atom", "structure"):
            return config["level"]
        descriptors = set(self.store.descriptor_names())
        return "structure" if names and set(names) <= descriptors else "atom"

    def breakdowns(self, test_rows: np.ndarray, level: str):
        """``(name, label per test row)`` for the breakdowns of that row level."""
        from ase.data import chemical_symbols

        if level == "structure":
            _check_rows(test_rows, self.store.n_structures, "structure")
            yield "subset", self.subsets[test_rows]
            return
        _check_rows(test_rows, self.store.n_atoms, "atom")
        structure = np.searchsorted(self.store.offsets, test_rows, side="right") - 1
        yield "subset", self.subsets[structure]
        numbers = np.asarray(self.store.structures["numbers"].get_orthogonal_selection(test_rows))
        yield "element", np.asarray(chemical_symbols, dtype=object)[numbers.astype(int)]


def _check_rows(rows: np.ndarray, n: int, what: str) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise DfreError(
            f"test_rows of a result point outside the store's {n} {what} rows: "
            "the result belongs to another store"
        )
