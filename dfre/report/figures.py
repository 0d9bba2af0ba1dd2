"""Figures of a dfre report (matplotlib): heat maps, breakdown facets, maps, curves.

Every function returns a :class:`matplotlib.figure.Figure` laid out with matplotlib's
constrained layout; :func:`save` writes it as PNG and SVG (text kept as text in the SVG,
so the printed values can be searched) after checking that no label is cut off at the
figure's edge (:func:`clipped_texts`; the figure is enlarged until none is).

Colours say what a number means: reconstruction errors (GFRE, LFRE) use ``viridis_r``
from 0 (yellow: reconstructed perfectly) upwards; linear CKA, a symmetric similarity in
[0, 1], uses ``Blues`` (dark: similar) with the same "feature set" label on both axes.

Breakdowns (per subset, per element) are the root mean squares of the pointwise errors
of the test rows of each group, from :func:`dfre.metrics.breakdown.pointwise_breakdown`,
drawn as one small heat map per source feature set (groups × targets, the number of test
environments of each group in its label) on one shared colour scale.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

# Figures are made as plain ``Figure`` objects, never through pyplot, so building a
# report neither needs nor changes a GUI backend (notebooks keep their inline figures).

#: Cells are annotated with their value when a heat map has at most this many cells.
MAX_ANNOTATED_CELLS = 900
#: Colour maps of errors (0 = perfect) and of similarities (1 = identical).
ERROR_CMAP = "viridis_r"
SIMILARITY_CMAP = "Blues"
#: Facets of a breakdown figure: at most this many per row, and within this width and
#: height (inches; about 1700 x 2300 pixels), so that a page shows them legibly.
FACET_COLUMNS = 4
FACET_WIDTH_INCHES = 14.0
FACET_HEIGHT_INCHES = 19.0
PNG_DPI = 120
#: Largest size (inches) :func:`save` grows a figure to while making room for its labels.
MAX_INCHES = 30.0


def _figure(*grid: int, figsize: tuple[float, float], **kwargs: Any):
    """A new constrained-layout figure and its axes, like ``pyplot.subplots``."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(*grid, **kwargs)


def cell_text(value: float, error: float | None = None) -> str:
    """How a heat map prints one value (with its uncertainty when given)."""
    if not np.isfinite(value):
        return "n/a"
    if error is not None and np.isfinite(error):
        return f"{value:.2f}\n±{error:.2f}"
    return f"{value:.2f}"


def _annotate(
    ax, values: np.ndarray, vmin: float, vmax: float, errors=None, size=8, gid="cell"
) -> None:
    """Write every value into its cell (white on the darker half of the colour map);
    each text has the SVG id ``<gid>-<row>-<column>``."""
    n_rows, n_cols = values.shape
    for i in range(n_rows):
        for j in range(n_cols):
            value = values[i, j]
            dark = np.isfinite(value) and (value - vmin) > 0.6 * (vmax - vmin)
            ax.text(
                j,
                i,
                cell_text(value, None if errors is None else errors[i, j]),
                ha="center",
                va="center",
                fontsize=size if errors is None else size - 1,
                color="white" if dark else "black",
                gid=f"{gid}-{i}-{j}",
            )


def heatmap(
    values: Any,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    row_label: str = "source (reconstructs from)",
    column_label: str = "target (is reconstructed)",
    colorbar_label: str = "error",
    errors: Any = None,
    cmap: str = ERROR_CMAP,
    vmin: float = 0.0,
    vmax: float | None = None,
) -> Figure:
    """A heat map of ``values`` (len(rows), len(columns)) with each value in its cell.

    ``errors`` (same shape), when given, are printed below each value as ``±err``.
    ``vmax`` defaults to the largest finite value, at least 1.
    """
    values = np.asarray(values, dtype=np.float64)
    n_rows, n_cols = values.shape
    longest = max((len(str(c)) for c in columns), default=4)
    cell = 0.75 if errors is None else 0.95
    width = max(2.6 + cell * max(n_cols, 2), 1.5 + 0.085 * len(title))
    height = 1.5 + 0.07 * longest + 0.5 * max(n_rows, 2) * (1.0 if errors is None else 1.3)
    fig, ax = _figure(figsize=(width, height))
    finite = values[np.isfinite(values)]
    if vmax is None:
        vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9)
    ax.set_xticks(range(n_cols), columns, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), rows)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    if values.size <= MAX_ANNOTATED_CELLS:
        _annotate(ax, values, vmin, vmax, None if errors is None else np.asarray(errors))
    return fig


def fre_heatmap(
    matrix: Any, names: Sequence[str], *, title: str, kind: str, errors: Any = None
) -> Figure:
    """GFRE or LFRE matrix: row i = source feature set, column j = target."""
    return heatmap(
        matrix,
        names,
        names,
        title=title,
        colorbar_label=f"{kind.upper()} (0: reconstructed exactly)",
        errors=errors,
    )


def cka_heatmap(cka: Any, names: Sequence[str], *, title: str) -> Figure:
    """Linear CKA, symmetric in its two feature sets: 1 (dark) = the same up to rotation
    and scale, 0 = unrelated."""
    return heatmap(
        cka,
        names,
        names,
        title=title,
        row_label="feature set",
        column_label="feature set",
        colorbar_label="linear CKA (1: most similar)",
        cmap=SIMILARITY_CMAP,
        vmin=0.0,
        vmax=1.0,
    )


def pair_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """Off-diagonal ``(source, target)`` pairs in matrix order."""
    return [(a, b) for a in names for b in names if a != b]


def breakdown_tables(
    frame: Any, names: Sequence[str], min_count: int = 1
) -> tuple[list[str], list[int], dict[str, tuple[list[str], np.ndarray]], list[tuple]]:
    """The breakdown as one (groups × targets) table per source feature set.

    ``frame`` has columns ``source``, ``target``, ``group``, ``count``, ``rmse`` (as made
    by :func:`dfre.metrics.breakdown.pointwise_breakdown`; pairs not computed are
    absent). Groups with fewer than ``min_count`` test environments are left out.
    Self-pairs are shown only for a source with nothing else computed.

    Returns the groups kept, their counts, ``{source: (targets, table)}`` in the order of
    ``names``, and the ``(group, count)`` left out.
    """
    counts: dict[str, int] = {}
    for group, count in zip(frame["group"], frame["count"], strict=True):
        counts[str(group)] = int(count)
    kept = sorted(g for g, c in counts.items() if c >= min_count)
    dropped = sorted((g, c) for g, c in counts.items() if c < min_count)
    row = {g: r for r, g in enumerate(kept)}
    present = set(zip(frame["source"], frame["target"], strict=True))
    facets = {}
    for source in names:
        targets = [t for t in names if t != source and (source, t) in present]
        if not targets and (source, source) in present:
            targets = [source]
        if not targets:
            continue
        column = {t: c for c, t in enumerate(targets)}
        table = np.full((len(kept), len(targets)), np.nan)
        for s, t, g, rmse in zip(
            frame["source"], frame["target"], frame["group"], frame["rmse"], strict=True
        ):
            if s == source and t in column and str(g) in row:
                table[row[str(g)], column[t]] = rmse
        facets[source] = (targets, table)
    return kept, [counts[g] for g in kept], facets, dropped


def breakdown_facets(
    frame: Any,
    names: Sequence[str],
    *,
    title: str,
    group_label: str,
    colorbar_label: str = "error",
    min_count: int = 1,
) -> list[Figure]:
    """Error of every computed source → target pair within each group, one facet per
    source: rows are the groups (``name (n=...)``, n its test environments), columns the
    targets, every facet on one colour scale.

    Facets fill rows of at most :data:`FACET_WIDTH_INCHES` and a figure holds as many
    rows as fit in :data:`FACET_HEIGHT_INCHES`, so that no figure grows beyond what a
    page shows legibly; more sources give more figures (titled ``1/2``, ``2/2``). No
    figure when no group has ``min_count`` test environments.
    """
    groups, counts, facets, _ = breakdown_tables(frame, names, min_count)
    if not groups or not facets:
        return []
    labels = [f"{g} (n={n})" for g, n in zip(groups, counts, strict=True)]
    most_targets = max(len(t) for t, _ in facets.values())
    longest = max(len(str(name)) for targets, _ in facets.values() for name in targets)
    cell_w = 0.5
    cell_h = 0.36 if len(groups) <= 12 else max(0.18, 0.28 * 24 / max(len(groups), 24))
    label_w = 0.3 + 0.075 * max(len(label) for label in labels)
    facet_w = 0.35 + cell_w * most_targets
    facet_h = 0.75 + 0.07 * longest + cell_h * len(groups)
    n_cols = int(max(1, min(FACET_COLUMNS, (FACET_WIDTH_INCHES - label_w) // facet_w)))
    n_cols = min(n_cols, len(facets))
    rows_per_figure = int(max(1, (FACET_HEIGHT_INCHES - 0.8) // facet_h))
    per_figure = n_cols * rows_per_figure
    finite = np.concatenate([t[np.isfinite(t)] for _, t in facets.values()])
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    items = list(facets.items())
    parts = [items[i : i + per_figure] for i in range(0, len(items), per_figure)]
    made = []
    for number, part in enumerate(parts, start=1):
        n_rows = math.ceil(len(part) / n_cols)
        fig, axes = _figure(
            n_rows,
            n_cols,
            figsize=(label_w + facet_w * n_cols + 1.3, facet_h * n_rows + 0.8),
            squeeze=False,
        )
        image = None
        for k, (ax, (source, (targets, table))) in enumerate(
            zip(axes.flat, part, strict=False), start=(number - 1) * per_figure
        ):
            image = ax.imshow(table, cmap=ERROR_CMAP, vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right",
                          rotation_mode="anchor", fontsize=8)  # fmt: skip
            first = (k - (number - 1) * per_figure) % n_cols == 0
            ax.set_yticks(range(len(groups)), labels if first else [], fontsize=8)
            ax.set_title(f"from {source}", fontsize=9)
            if table.size <= MAX_ANNOTATED_CELLS:
                _annotate(ax, table, 0.0, vmax, size=7, gid=f"facet{k}-cell")
        for ax in list(axes.flat)[len(part) :]:
            ax.set_visible(False)
        fig.colorbar(image, ax=axes, label=colorbar_label, shrink=0.6)
        fig.suptitle(title if len(parts) == 1 else f"{title} ({number}/{len(parts)})")
        fig.supylabel(group_label)
        fig.supxlabel("target (is reconstructed)")
        made.append(fig)
    return made


def pcovr_maps(
    coordinates: Any,
    subsets: Any,
    target: Any,
    *,
    title: str,
    target_label: str,
    reference: Any = None,
    missing_label: str = "no target",
) -> Figure:
    """Two panels: the map coloured by subset and by target.

    Structures without a target are grey crosses (legend ``missing_label``); a map fitted
    on another store shows that store's structures as a light grey background.
    """
    coordinates = np.asarray(coordinates, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    subsets = np.asarray(subsets).astype(str)
    fig, (left, right) = _figure(1, 2, figsize=(12, 4.8))
    for ax in (left, right):
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            ax.scatter(ref[:, 0], ref[:, 1], s=6, c="0.85", label="fitting store", rasterized=True)
        ax.set_xlabel("PCov 1")
        ax.set_ylabel("PCov 2" if coordinates.shape[1] > 1 else "")
    y = coordinates[:, 1] if coordinates.shape[1] > 1 else np.zeros(len(coordinates))
    cmap = matplotlib.colormaps.get_cmap("tab20" if len(set(subsets.tolist())) > 10 else "tab10")
    for k, subset in enumerate(sorted(set(subsets.tolist()))):
        rows = subsets == subset
        left.scatter(coordinates[rows, 0], y[rows], s=8, color=cmap(k % cmap.N), label=subset)
    left.legend(fontsize=7, markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    left.set_title(f"{title}\nby subset", fontsize=10)
    known = np.isfinite(target)
    if (~known).any():
        right.scatter(
            coordinates[~known, 0],
            y[~known],
            s=10,
            c="0.55",
            marker="x",
            label=f"{missing_label} ({int((~known).sum())})",
        )
    points = right.scatter(coordinates[known, 0], y[known], s=8, c=target[known], cmap="plasma")
    fig.colorbar(points, ax=right, label=target_label)
    if (~known).any() or reference is not None:
        right.legend(fontsize=7, loc="best")
    right.set_title(f"{title}\nby {target_label}", fontsize=10)
    return fig


def checkpoint_curves(series: Sequence[dict], *, title: str) -> Figure:
    """FRE of each checkpoint against the final model, one line per series.

    Each series is ``{"label": str, "x": [...], "y": [...], "x_label": str}``.
    """
    fig, ax = _figure(figsize=(6.5, 4.2))
    for s in series:
        ax.plot(s["x"], s["y"], marker="o", label=s["label"])
    ax.set_xlabel(series[0].get("x_label", "checkpoint") if series else "checkpoint")
    ax.set_ylabel("reconstruction error vs final checkpoint")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def clipped_texts(fig: Figure, tolerance: float = 1.0, *, drawn: bool = False) -> list[str]:
    """What of ``fig`` reaches beyond its edges when drawn as :func:`save` draws it: the
    titles (or ``axes N``) of axes whose labels, ticks or texts are cut off, and cut-off
    figure texts and legends. Empty when nothing is cut off. ``drawn``: ``fig`` was just
    drawn on its Agg canvas at :data:`PNG_DPI` (as :func:`save` does), so it is not drawn
    again."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if drawn:
        renderer = fig.canvas.get_renderer()
    else:
        fig.set_dpi(PNG_DPI)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
    box = fig.bbox
    clipped = []
    parts = [(ax.get_title() or ax.get_ylabel() or f"axes {i}", ax) for i, ax in
             enumerate(fig.axes)]  # fmt: skip
    parts += [(text.get_text(), text) for text in fig.texts]
    parts += [("legend", legend) for legend in fig.legends]
    for name, artist in parts:
        if not artist.get_visible():
            continue
        extent = artist.get_tightbbox(renderer)
        if extent is None or extent.width == 0 or extent.height == 0:
            continue
        if (
            extent.x0 < box.x0 - tolerance
            or extent.y0 < box.y0 - tolerance
            or extent.x1 > box.x1 + tolerance
            or extent.y1 > box.y1 + tolerance
        ):
            clipped.append(name)
    return clipped


def save(fig: Figure, directory: str | os.PathLike, stem: str) -> dict[str, str]:
    """Write ``<stem>.png`` and ``<stem>.svg`` into ``directory``, nothing cut off.

    The figure is drawn once for the PNG and checked on that drawing; while a label is
    cut off (:func:`clipped_texts`) it is enlarged (by 20 %, at most to
    :data:`MAX_INCHES`) and drawn again, letting constrained layout make the room.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imsave

    fig.set_dpi(PNG_DPI)
    canvas = FigureCanvasAgg(fig)
    for _ in range(5):
        canvas.draw()
        width, height = fig.get_size_inches()
        if not clipped_texts(fig, drawn=True) or max(width, height) >= MAX_INCHES:
            break
        fig.set_size_inches(min(width * 1.2, MAX_INCHES), min(height * 1.15, MAX_INCHES))
    directory = os.fspath(directory)
    paths = {ext: os.path.join(directory, f"{stem}.{ext}") for ext in ("png", "svg")}
    imsave(paths["png"], np.asarray(canvas.buffer_rgba()), dpi=PNG_DPI)
    # the SVG keeps the layout of the PNG (not laid out again: 40 % of its time) and is the
    # same file for the same figure (no date, fixed ids)
    with (
        matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dfre"}),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        fig.set_layout_engine("none")
        fig.savefig(paths["svg"], format="svg", metadata={"Date": None})
    return paths
