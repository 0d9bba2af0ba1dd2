"""Figures of a dfre report (matplotlib): heat maps, breakdowns, maps, curves.

Every function returns a :class:`matplotlib.figure.Figure`; :func:`save` writes it as PNG
and SVG (text kept as text in the SVG, so the printed values can be searched).

Breakdowns (per subset, per element) are the root mean squares of the pointwise errors
of the test rows of each group, from :func:`dfre.metrics.breakdown.pointwise_breakdown`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

# Figures are made as plain ``Figure`` objects, never through pyplot, so building a
# report neither needs nor changes a GUI backend (notebooks keep their inline figures).

#: Cells are annotated with their value when a heat map has at most this many cells.
MAX_ANNOTATED_CELLS = 900


def _subplots(*grid: int, figsize: tuple[float, float]):
    """A new figure and its axes, like ``pyplot.subplots`` but without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


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
    width = max(1.6 + 0.75 * max(n_cols, 2), 1.5 + 0.085 * len(title))  # room for the title
    fig, ax = _subplots(figsize=(width, 1.4 + 0.55 * max(n_rows, 2)))
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


def pair_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """Off-diagonal ``(source, target)`` pairs in matrix order."""
    return [(a, b) for a in names for b in names if a != b]


def breakdown_heatmap(
    frame: Any,
    names: Sequence[str],
    *,
    title: str,
    group_label: str,
    colorbar_label: str = "error",
) -> Figure:
    """Error of every computed source → target pair (columns) within each group (rows).

    ``frame`` has columns ``source``, ``target``, ``group``, ``rmse``, as made by
    :func:`dfre.metrics.breakdown.pointwise_breakdown` (pairs not computed are absent).
    Self-pairs are shown only when nothing else was computed.
    """
    present = set(zip(frame["source"], frame["target"], strict=True))
    pairs = [p for p in pair_names(names) if p in present]
    if not pairs:
        pairs = [(a, a) for a in names if (a, a) in present]
    groups = sorted({str(g) for g in frame["group"]})
    row = {g: r for r, g in enumerate(groups)}
    column = {p: c for c, p in enumerate(pairs)}
    table = np.full((len(groups), len(pairs)), np.nan)
    for source, target, group, rmse in zip(
        frame["source"], frame["target"], frame["group"], frame["rmse"], strict=True
    ):
        if (source, target) in column:
            table[row[str(group)], column[(source, target)]] = rmse
    return heatmap(
        table,
        groups,
        [f"{a} → {b}" for a, b in pairs],
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
    fig, (left, right) = _subplots(1, 2, figsize=(11, 4.6))
    for ax in (left, right):
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            ax.scatter(ref[:, 0], ref[:, 1], s=6, c="0.8", label="fitted on", rasterized=True)
        ax.set_xlabel("PCov 1")
        ax.set_ylabel("PCov 2" if coordinates.shape[1] > 1 else "")
    y = coordinates[:, 1] if coordinates.shape[1] > 1 else np.zeros(len(coordinates))
    cmap = matplotlib.colormaps.get_cmap("tab20" if len(set(subsets.tolist())) > 10 else "tab10")
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
    fig, ax = _subplots(figsize=(6.5, 4.2))
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
    """Write ``<stem>.png`` and ``<stem>.svg`` into ``directory``."""
    paths = {}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for ext in ("png", "svg"):
            path = os.path.join(os.fspath(directory), f"{stem}.{ext}")
            fig.savefig(path, dpi=120 if ext == "png" else None)
            paths[ext] = path
    return paths
