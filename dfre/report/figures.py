"""Figures of a dfre report (matplotlib, Agg backend): heat maps, breakdowns, maps, curves.

Every function returns a :class:`matplotlib.figure.Figure`; :func:`save` writes it as PNG
and SVG (text kept as text in the SVG, so the printed values can be searched).

Breakdowns: for a group :math:`g` of test rows (a subset, an element) the error of a
pair is the root mean square of the pointwise errors of its rows,

.. math:: \\mathrm{FRE}_g(F_i \\to F_j) = \\sqrt{\\frac{1}{|g|}\\sum_{r \\in g}
          e_{ij,r}^2}, \\qquad e_{ij,r} = \\lVert x'_{j,r} - \\hat x'_{j,r} \\rVert ,

so over all test rows it is the matrix entry itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: Cells are annotated with their value when a heat map has at most this many cells.
MAX_ANNOTATED_CELLS = 900


def cell_text(value: float) -> str:
    """How a heat map prints one value."""
    return "n/a" if not np.isfinite(value) else f"{value:.2f}"


def heatmap(
    values: Any,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    row_label: str = "source (reconstructs from)",
    column_label: str = "target (is reconstructed)",
    colorbar_label: str = "error",
) -> Figure:
    """A heat map of ``values`` (len(rows), len(columns)) with each value in its cell."""
    values = np.asarray(values, dtype=np.float64)
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * max(n_cols, 2), 1.4 + 0.55 * max(n_rows, 2)))
    finite = values[np.isfinite(values)]
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    image = ax.imshow(values, cmap="viridis_r", vmin=0.0, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.8)
    ax.set_xticks(range(n_cols), columns, rotation=45, ha="right")
    ax.set_yticks(range(n_rows), rows)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    if values.size <= MAX_ANNOTATED_CELLS:
        for i in range(n_rows):
            for j in range(n_cols):
                value = values[i, j]
                dark = np.isfinite(value) and value > 0.6 * vmax
                ax.text(
                    j,
                    i,
                    cell_text(value),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                    gid=f"cell-{i}-{j}",
                )
    fig.tight_layout()
    return fig


def fre_heatmap(matrix: Any, names: Sequence[str], *, title: str, kind: str) -> Figure:
    """GFRE or LFRE matrix: row i = source feature set, column j = target."""
    return heatmap(matrix, names, names, title=title, colorbar_label=kind.upper())


def group_errors(pointwise: Any, labels: Any) -> tuple[list[str], np.ndarray]:
    """Per-group errors (G, M, M) of ``pointwise`` (M, M, n_test) grouped by ``labels``."""
    pointwise = np.asarray(pointwise, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    groups = sorted(set(labels.tolist()))
    values = (
        np.stack([np.sqrt(np.mean(pointwise[:, :, labels == g] ** 2, axis=2)) for g in groups])
        if groups
        else np.zeros((0,) + pointwise.shape[:2])
    )
    return groups, values


def pair_names(names: Sequence[str]) -> list[tuple[int, int, str]]:
    """Off-diagonal pairs ``(i, j, "source → target")``."""
    return [
        (i, j, f"{a} → {b}") for i, a in enumerate(names) for j, b in enumerate(names) if i != j
    ]


def breakdown_heatmap(
    groups: Sequence[str],
    values: Any,
    names: Sequence[str],
    *,
    title: str,
    group_label: str,
    colorbar_label: str = "error",
) -> Figure:
    """Error of every computed source → target pair (columns) within each group (rows).

    Pairs the result did not compute (all NaN) are left out.
    """
    values = np.asarray(values, dtype=np.float64)
    pairs = [(i, j, n) for i, j, n in pair_names(names) if np.isfinite(values[:, i, j]).any()]
    table = np.array([[values[g, i, j] for i, j, _ in pairs] for g in range(len(groups))])
    if not pairs:  # a single feature set: show its self-reconstruction
        pairs, table = [(0, 0, f"{names[0]} → {names[0]}")], values[:, :1, 0]
    return heatmap(
        table.reshape(len(groups), len(pairs)),
        groups,
        [p[2] for p in pairs],
        title=title,
        row_label=group_label,
        column_label="source → target",
        colorbar_label=colorbar_label,
    )


def pcovr_maps(
    coordinates: Any,
    subsets: Any,
    target: Any,
    *,
    title: str,
    target_label: str,
    reference: Any = None,
) -> Figure:
    """Two panels: the map coloured by subset and by target (grey: the fitting store)."""
    coordinates = np.asarray(coordinates, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    subsets = np.asarray(subsets).astype(str)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax in (left, right):
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            ax.scatter(ref[:, 0], ref[:, 1], s=6, c="0.8", label="fitted on", rasterized=True)
        ax.set_xlabel("PCov 1")
        ax.set_ylabel("PCov 2" if coordinates.shape[1] > 1 else "")
    y = coordinates[:, 1] if coordinates.shape[1] > 1 else np.zeros(len(coordinates))
    cmap = plt.get_cmap("tab20" if len(set(subsets.tolist())) > 10 else "tab10")
    for k, subset in enumerate(sorted(set(subsets.tolist()))):
        rows = subsets == subset
        left.scatter(coordinates[rows, 0], y[rows], s=8, color=cmap(k % cmap.N), label=subset)
    left.legend(fontsize=7, markerscale=1.5, loc="best")
    left.set_title(f"{title}: by subset")
    known = np.isfinite(target)
    right.scatter(coordinates[~known, 0], y[~known], s=6, c="0.6", marker="x")
    points = right.scatter(coordinates[known, 0], y[known], s=8, c=target[known], cmap="plasma")
    fig.colorbar(points, ax=right, label=target_label)
    right.set_title(f"{title}: by {target_label}")
    fig.tight_layout()
    return fig


def checkpoint_curves(series: Sequence[dict], *, title: str) -> Figure:
    """FRE of each checkpoint against the final model, one line per series.

    Each series is ``{"label": str, "x": [...], "y": [...], "x_label": str}``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in series:
        ax.plot(s["x"], s["y"], marker="o", label=s["label"])
    ax.set_xlabel(series[0].get("x_label", "checkpoint") if series else "checkpoint")
    ax.set_ylabel("reconstruction error vs final checkpoint")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig: Figure, directory: str | os.PathLike, stem: str) -> dict[str, str]:
    """Write ``<stem>.png`` and ``<stem>.svg`` into ``directory``; close the figure."""
    paths = {}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for ext in ("png", "svg"):
            path = os.path.join(os.fspath(directory), f"{stem}.{ext}")
            fig.savefig(path, dpi=120 if ext == "png" else None)
            paths[ext] = path
    plt.close(fig)
    return paths
