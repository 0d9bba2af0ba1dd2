"""Reuse of results whose inputs and settings have not changed since they were made.

A result ``results/<run>`` (or a descriptor ``descriptors/<name>``) records in its
attributes an ``input_key``: the sha256 of

- what made it and how: the kind (``gfre``, ``lfre``, ``pcovr``, ``cumulants``, ...)
  and its settings (selection spec and seed, solver, alphas, k, order, ...);
- the identity of every array it read: the feature sets with their masks and done
  records, descriptors, and the structure arrays that define rows and subsets;
- the source code of the dfre modules that compute it (so a changed algorithm is
  never answered with an old number) and dfre's version.

The identity of an array in a local store is the list of its files (chunks and
metadata) with their sizes and modification times in nanoseconds. Any write to a chunk,
to the attributes or to the shape changes it; reading it costs one ``stat`` per file and
no data. (A content checksum would read every feature again on each run; the done
records alone would miss a chunk rewritten in place.) Arrays of stores behind URLs have
no identity here, so their results are always recomputed.

A step whose key equals the stored one is skipped (``--force`` recomputes); a step
interrupted between writing a result and stamping it leaves no key, so it runs again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Source folders and modules whose code decides the numbers of a result.
CODE_PATHS = (
    "metrics",
    "linalg",
    "descriptors",
    "projection",
    "data/selection.py",
    "store.py",
)
#: Structure arrays every result depends on (rows, structures, subsets).
STRUCTURE_ARRAYS = ("structures/offsets", "structures/info/subset")


@functools.cache
def code_identity() -> str:
    """sha256 of dfre's version and of the source of the modules in :data:`CODE_PATHS`."""
    from dfre import __version__

    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(__version__.encode())
    for entry in CODE_PATHS:
        path = os.path.join(root, entry)
        files = (
            sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(path)
                for name in names
                if name.endswith(".py")
            )
            if os.path.isdir(path)
            else [path]
        )
        for file in files:
            digest.update(os.path.relpath(file, root).encode())
            with open(file, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def array_identity(store: Any, path: str) -> list | None:
    """Files of array ``path`` of ``store`` with sizes and mtimes, or None (no identity).

    ``["absent"]`` for an array that does not exist (its appearance changes the key).
    """
    root = os.fspath(store.path)
    if "://" in root:
        return None
    folder = os.path.join(root, *path.split("/"))
    if not os.path.isdir(folder):
        return ["absent"]
    files = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        for name in sorted(names):
            full = os.path.join(directory, name)
            info = os.stat(full)
            files.append([os.path.relpath(full, folder), info.st_size, info.st_mtime_ns])
    return files


def input_arrays(store: Any, names: Iterable[str]) -> list[str]:
    """The store arrays read for feature sets or descriptors ``names`` (with their masks)."""
    descriptors = set(store.descriptor_names())
    arrays = list(STRUCTURE_ARRAYS)
    for name in names:
        if name in descriptors:
            arrays.append(f"descriptors/{name}")
            continue
        model, _, layer = name.partition("/")
        arrays += [f"features/{name}", f"features/{model}/_mask", f"features/{model}/_done_{layer}"]
    return arrays


def input_key(
    store: Any,
    kind: str,
    names: Sequence[str],
    settings: Mapping[str, Any],
    *,
    arrays: Sequence[str] = (),
) -> str | None:
    """The key of a step of ``kind`` reading ``names`` (and ``arrays``) with ``settings``.

    None when some input has no identity (a store behind a URL): nothing is reused then.
    """
    identities = {}
    for path in [*input_arrays(store, names), *arrays]:
        identity = array_identity(store, path)
        if identity is None:
            return None
        identities[path] = identity
    document = {
        "kind": kind,
        "names": list(names),
        "settings": settings,
        "n_atoms": store.n_atoms,
        "n_structures": store.n_structures,
        "arrays": identities,
        "code": code_identity(),
    }
    text = json.dumps(document, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """JSON form of numpy numbers and arrays in settings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def reusable(store: Any, run: str, key: str | None) -> bool:
    """Whether ``results/<run>`` holds a finished result made with input key ``key``."""
    if key is None or run not in store.result_names():
        return False
    attrs = store.result(run).attrs
    return attrs.get("input_key") == key and attrs.get("kind") is not None


def stamp(store: Any, run: str, key: str | None) -> None:
    """Record ``key`` in ``results/<run>`` (after the result was written)."""
    if key is not None:
        store.result(run).attrs["input_key"] = key


def descriptor_reusable(store: Any, name: str, key: str | None) -> bool:
    """Whether ``descriptors/<name>`` is complete and was made with input key ``key``."""
    if key is None or name not in store.descriptor_names():
        return False
    attrs = store.group["descriptors"][name].attrs
    return attrs.get("input_key") == key and bool(attrs.get("complete"))


def stamp_descriptor(store: Any, name: str, key: str | None) -> None:
    """Record ``key`` in ``descriptors/<name>``."""
    if key is not None:
        store.group["descriptors"][name].attrs["input_key"] = key


def gfre_settings(selection: Any, seed: int, options: Mapping[str, Any]) -> dict:
    """The settings of a GFRE run that decide its numbers."""
    return {"selection": _spec(selection), "seed": seed, **options}


def lfre_settings(selection: Any, seed: int, k: Any, options: Mapping[str, Any]) -> dict:
    """The settings of an LFRE run that decide its numbers."""
    return {"selection": _spec(selection), "seed": seed, "k": k, **options}


def _spec(selection: Any) -> str:
    if isinstance(selection, str):
        return selection
    spec = getattr(selection, "spec", None)
    if spec is None or spec == "explicit":
        raise ValueError("only selections made from a spec can be keyed")
    return spec
