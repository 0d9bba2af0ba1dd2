"""Export a store to a chemiscope input file (structures, properties, map coordinates).

The file is written by the ``chemiscope`` package (``chemiscope.write_input``); a name
ending in ``.gz`` gives a gzip-compressed JSON file that chemiscope.org opens directly.

Properties (all per structure): every structure info key (numbers or text, NaN/"" where
a structure has none), ``n_atoms``, and for each PCovR result ``results/<run>`` its
coordinates ``<run>[1]``, ``<run>[2]``, ... and its target ``<run> target``. The map
shows the first PCovR result (x, y) coloured by its target when one exists.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dfre.errors import DfreError


def pcovr_runs(store: Any) -> list[str]:
    """Names of the finished PCovR results of ``store``."""
    return [r for r in store.result_names() if store.result(r).attrs.get("kind") == "pcovr"]


def chemiscope_properties(store: Any, rows: np.ndarray, maps: list[str]) -> dict[str, dict]:
    """The chemiscope ``properties`` of structures ``rows`` (see module docstring)."""
    properties: dict[str, dict] = {
        "n_atoms": {"target": "structure", "values": store.counts[rows].astype(float)}
    }
    for key in store.info_keys():
        values = store.info(key)[rows]
        if values.dtype.kind in "fiu":
            values = values.astype(float)
        else:
            values = [str(v) for v in values]
        properties[key] = {"target": "structure", "values": values}
    for run in maps:
        group = store.result(run)
        description = f"PCovR of {group.attrs.get('descriptor')} (results/{run})"
        properties[run] = {
            "target": "structure",
            "values": np.asarray(group["coordinates"][...])[rows],
            "description": description,
        }
        properties[f"{run} target"] = {
            "target": "structure",
            "values": np.asarray(group["target"][...], dtype=float)[rows],
            "description": f"{group.attrs.get('target')}: target of {description}",
        }
    return properties


def export_chemiscope(
    store: Any,
    path: str | os.PathLike,
    *,
    maps: list[str] | None = None,
    max_structures: int | None = None,
    seed: int = 0,
) -> dict:
    """Write the chemiscope input file ``path``; return a summary.

    ``maps`` are PCovR result names (default: every PCovR result). ``max_structures``
    keeps that many structures drawn at random (with ``seed``), in store order.
    """
    import chemiscope

    if store.n_structures == 0:
        raise DfreError(f"store {store.path} has no structures to export")
    maps = pcovr_runs(store) if maps is None else list(maps)
    for run in maps:
        if store.result(run).attrs.get("kind") != "pcovr":
            raise DfreError(f"results/{run} is not a PCovR map: choose one made by `dfre pcovr`")
    rows = np.arange(store.n_structures)
    if max_structures is not None:
        if max_structures < 1:
            raise DfreError(f"--max-structures must be >= 1 (got {max_structures})")
        if max_structures < len(rows):
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_structures, replace=False))
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise DfreError(f"cannot write {path}: folder {folder} does not exist")
    properties = chemiscope_properties(store, rows, maps)
    settings = {}
    if maps:
        first = maps[0]
        settings = {
            "map": {
                "x": {"property": f"{first}[1]"},
                "y": {
                    "property": f"{first}[2]"
                    if f"{first}[2]" in _expanded(properties)
                    else f"{first}[1]"
                },
                "color": {"property": f"{first} target"},
            }
        }
    chemiscope.write_input(
        os.fspath(path),
        structures=list(store.iter_atoms(rows)),
        properties=properties,
        settings=settings,
        metadata={
            "name": os.path.basename(os.path.normpath(str(store.path))),
            "description": f"dfre store {store.path}: {len(rows)} of {store.n_structures} "
            f"structures; maps: {', '.join(maps) or 'none'}",
        },
    )
    return {
        "path": os.fspath(path),
        "structures": len(rows),
        "properties": len(_expanded(properties)),
        "maps": maps,
    }


def _expanded(properties: dict[str, dict]) -> list[str]:
    """Property names as chemiscope writes them (2-D values become ``name[k]``)."""
    names = []
    for name, prop in properties.items():
        values = prop["values"]
        if isinstance(values, np.ndarray) and values.ndim == 2:
            names.extend(f"{name}[{k + 1}]" for k in range(values.shape[1]))
        else:
            names.append(name)
    return names
