"""How ``dfre gfre`` and ``dfre lfre`` show a result: matrix with error bars, what the
numbers rest on (spectra, solver path), flagged entries and sanity warnings."""

from __future__ import annotations

import argparse
from typing import Any


def alpha_floor_option(text: str) -> str | float:
    """``--alpha-floor``: ``none`` (skmatter's grid), ``auto`` (noise floor) or a number."""
    if text in ("none", "auto"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text}: give none, auto or a relative cutoff such as 1e-6"
        ) from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a relative cutoff lies in [0, 1)")
    return value


def add_alpha_floor_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha-floor",
        type=alpha_floor_option,
        default="none",
        metavar="none|auto|VALUE",
        help="lowest relative cutoff of the ridge CV grid: none (skmatter's grid down to "
        "1e-9, the paper's protocol; default), auto (never below the features' storage "
        "noise floor) or a number",
    )


def format_matrix(names: list[str], matrix: Any, error: Any = None) -> str:
    """The matrix as text (one row per source, one column per target), ``value±error``."""
    import numpy as np

    cells = [
        [
            f"{v:.4f}" if error is None or not np.isfinite(e) else f"{v:.4f}±{e:.4f}"
            for v, e in zip(row, erow, strict=True)
        ]
        for row, erow in zip(
            matrix, np.full(matrix.shape, np.nan) if error is None else error, strict=True
        )
    ]
    width = max(10, *(len(n) for n in names), *(len(c) for row in cells for c in row))
    lines = ["source \\ target".ljust(width) + "".join(n.rjust(width + 2) for n in names)]
    for name, row in zip(names, cells, strict=True):
        lines.append(name.ljust(width) + "".join(c.rjust(width + 2) for c in row))
    return "\n".join(lines)


def _where(env: dict) -> str:
    if "structure" not in env:
        return f"row {env['row']}"
    place = f"structure {env['structure']}"
    if "atom" in env:
        place += f" atom {env['atom']} ({env['element']})"
    return place + f", {env['subset']}"


def diagnostics_lines(config: dict) -> list[str]:
    """Plain-text lines of a result's diagnostics (``config["diagnostics"]``)."""
    diag = config.get("diagnostics") or {}
    lines = []
    exact = config.get("exact_path_for")
    if exact:
        lines.append(
            f"exact (TSQR) path taken: the spectra of {', '.join(exact)} reach below what the "
            "normal equations resolve"
        )
    for name, info in (diag.get("feature_sets") or {}).items():
        condition = info.get("condition")
        cond = "inf" if condition is None else f"{condition:.2g}"
        floor = info.get("noise_floor")
        lines.append(
            f"{name}: numerical rank {info['rank']}/{info['dim']} above the storage noise "
            f"floor ({'?' if floor is None else f'{floor:.1e}'} of s_max), condition {cond}"
        )
    for flag in diag.get("flags") or []:
        value = f"{flag['value']:.4f}"
        if flag.get("error") is not None:
            value += f"±{flag['error']:.4f}"
        lines.append(
            f"flag {flag['source']} -> {flag['target']} = {value}: " + "; ".join(flag["reasons"])
        )
        for env in flag.get("environments", [])[:3]:
            lines.append(
                f"    {_where(env)}: error {env['error']:.3g} ({env['share']:.0%} of the squared "
                "error)"
            )
    for warning in diag.get("warnings") or []:
        lines.append(f"warning: {warning}")
    return lines


def result_json(result: dict) -> dict:
    """The error bars and diagnostics of a stored result (``names``, arrays, ``config``),
    for ``--json`` output."""
    config = result.get("config", {})
    error = result.get("error")
    out = {
        "error": None if error is None else _json_matrix(error),
        "diagnostics": config.get("diagnostics"),
    }
    for key in ("solver", "solver_used", "exact_path_for", "alpha_floor"):
        if key in config:
            out[key] = config[key]
    return out


def _json_matrix(values: Any) -> list:
    import numpy as np

    return [[None if not np.isfinite(v) else float(v) for v in row] for row in values]
