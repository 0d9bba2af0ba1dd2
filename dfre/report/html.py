"""One self-contained HTML page: a plain-language header, then one section per result.

Every figure is embedded (PNG as base64; the SVG file sits next to the page and is
linked). A section may carry tables (sortable by a click on a column header) and its
settings, shown on demand in a ``<details>`` block as a two-column table -- never as raw
JSON; all settings as JSON go to ``runs.json`` next to the page.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FigureFile:
    """A saved figure: caption and the paths of its PNG and SVG files."""

    caption: str
    png: str
    svg: str
    wide: bool = False  # takes the whole width of the page


@dataclass
class Table:
    """A table of the page: column names and rows of cells (numbers are formatted)."""

    caption: str
    columns: list[str]
    rows: list[list[Any]]
    digits: int = 4


@dataclass
class Section:
    """A titled group of paragraphs, figures and tables, with the settings they come from."""

    title: str
    figures: list[FigureFile] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    anchor: str = ""


@dataclass
class Header:
    """The top of the page: what was analysed, and the main findings, in plain words."""

    facts: list[tuple[str, str]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    intro: str = ""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px;
       padding: 0 1em; color: #222; line-height: 1.45; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.3em 1.2em; }
header dt { font-weight: 600; }
header dd { margin: 0; }
nav ol { columns: 2; }
section { border-top: 1px solid #ccc; margin-top: 2em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0.5em 0; max-width: 100%; }
figure.wide { flex-basis: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.sortable { cursor: pointer; background: #f4f4f4; }
th.sortable::after { content: " \\2195"; color: #999; }
details { margin: 0.6em 0; }
summary { cursor: pointer; color: #1a4f8b; }
.scroll { overflow-x: auto; max-width: 100%; }
"""

_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.from(body.rows);
      var up = th.dataset.order !== "up";
      th.dataset.order = up ? "up" : "down";
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value || a.cells[column].textContent;
        var y = b.cells[column].dataset.value || b.cells[column].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return up ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def render_html(
    title: str,
    sections: Sequence[Section],
    *,
    header: Header | None = None,
    settings_file: str | None = None,
) -> str:
    """The page as a string; images are read from the PNG paths and embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
    ]
    if header is not None:
        parts.append(_header(header))
    if len(sections) > 1:
        parts.append("<nav><h2>Contents</h2><ol>")
        for section in sections:
            parts.append(f'<li><a href="#{section.anchor}">{html.escape(section.title)}</a></li>')
        parts.append("</ol></nav>")
    parts.append("</header><main>")
    for section in sections:
        parts.append(_section(section))
    parts.append("</main>")
    if settings_file:
        name = html.escape(settings_file)
        parts.append(
            f'<footer><p>Every setting of every result, as JSON: <a href="{name}">{name}</a>.'
            "</p></footer>"
        )
    parts.append(f"<script>{_SORT_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _header(header: Header) -> str:
    parts = []
    if header.intro:
        parts.append(f"<p>{html.escape(header.intro)}</p>")
    if header.facts:
        parts.append("<dl>")
        for label, text in header.facts:
            parts.append(f"<dt>{html.escape(label)}</dt><dd>{html.escape(text)}</dd>")
        parts.append("</dl>")
    if header.findings:
        parts.append("<h2>Main findings</h2><ul>")
        parts.extend(f"<li>{html.escape(line)}</li>" for line in header.findings)
        parts.append("</ul>")
    return "\n".join(parts)


def _section(section: Section) -> str:
    parts = [f'<section id="{html.escape(section.anchor)}"><h2>{html.escape(section.title)}</h2>']
    for note in section.notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    if section.figures:
        parts.append('<div class="figures">')
        for figure in section.figures:
            with open(figure.png, "rb") as fh:
                data = base64.b64encode(fh.read()).decode("ascii")
            caption = html.escape(figure.caption)
            svg = html.escape(os.path.basename(figure.svg))
            parts.append(
                f"<figure{' class=wide' if figure.wide else ''}>"
                f'<img src="data:image/png;base64,{data}" alt="{caption}">'
                f'<figcaption>{caption} (<a href="{svg}">SVG</a>)</figcaption></figure>'
            )
        parts.append("</div>")
    for table in section.tables:
        parts.append(f"<details><summary>{html.escape(table.caption)}</summary>")
        parts.append(render_table(table))
        parts.append("</details>")
    if section.config:
        parts.append("<details><summary>settings of this result</summary>")
        parts.append(render_table(settings_table(section.config), sortable=False))
        parts.append("</details>")
    parts.append("</section>")
    return "\n".join(parts)


def render_table(table: Table, *, sortable: bool = True) -> str:
    """A table element; numeric cells are right-aligned and sort as numbers."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = []
        for value in row:
            if isinstance(value, bool) or not isinstance(value, int | float):
                cells.append(f"<td>{html.escape(str(value))}</td>")
            elif isinstance(value, float) and value != value:  # NaN
                cells.append('<td class="num" data-value="">n/a</td>')
            else:
                text = _number(value, table.digits)
                cells.append(f'<td class="num" data-value="{value}">{text}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    kind = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{kind}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _number(value: int | float, digits: int) -> str:
    """Integers with separators; floats with ``digits`` decimals, or in scientific
    notation when that would show no significant digit (or too many): 1e-9, 3.2e+10."""
    if not isinstance(value, float):
        return f"{value:,}"
    if value != 0 and not 10.0 ** (-digits) <= abs(value) < 1e6:
        return f"{value:.{max(digits - 2, 1)}e}"
    return f"{value:.{digits}f}"


def settings_table(config: dict) -> Table:
    """A result's attributes as a two-column table of readable values."""
    rows = [[key, readable(value)] for key, value in flatten(config)]
    return Table("settings", ["setting", "value"], rows)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted.key, value)`` pairs in key order."""
    if isinstance(value, dict) and value:
        items = []
        for key in sorted(value, key=str):
            items += flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return items
    return [(prefix, value)]


def readable(value: Any) -> str:
    """A setting as a short text: lists of many numbers become ``20 values, a … b``."""
    if isinstance(value, list | tuple):
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if numbers and len(value) > 6:
            return f"{len(value)} values, {value[0]:.3g} … {value[-1]:.3g}"
        return ", ".join(readable(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "none" if not value else str(value)
    return str(value)
