"""One self-contained HTML page: every figure embedded (PNG as base64), with the
configuration of the run it comes from; the SVG files sit next to it."""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class FigureFile:
    """A saved figure: caption and the paths of its PNG and SVG files."""

    caption: str
    png: str
    svg: str


@dataclass
class Section:
    """A titled group of figures, with the configuration (attrs) they come from."""

    title: str
    figures: list[FigureFile] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
section { border-top: 1px solid #ccc; margin-top: 2em; }
figure { display: inline-block; margin: 1em; vertical-align: top; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
"""


def render_html(title: str, sections: Sequence[Section], *, preamble: dict | None = None) -> str:
    """The page as a string; images are read from the PNG paths and embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if preamble:
        parts.append(_config_block(preamble))
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for note in section.notes:
            parts.append(f"<p>{html.escape(note)}</p>")
        for figure in section.figures:
            with open(figure.png, "rb") as fh:
                data = base64.b64encode(fh.read()).decode("ascii")
            caption = html.escape(figure.caption)
            svg = html.escape(os.path.basename(figure.svg))
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f'<figcaption>{caption} (<a href="{svg}">SVG</a>)</figcaption></figure>'
            )
        if section.config:
            parts.append("<details><summary>configuration</summary>")
            parts.append(_config_block(section.config))
            parts.append("</details>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _config_block(config: dict) -> str:
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    return f"<pre>{html.escape(text)}</pre>"
