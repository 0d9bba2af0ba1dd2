"""Names dfre gives to groups of a store, checked before anything is written.

This module imports nothing heavy, so that the command line checks names before it loads
numpy, Dask or Zarr.
"""

from __future__ import annotations

import re
from typing import Any

from dfre.errors import DfreError

RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_run_name(run: Any) -> str:
    """``run`` if it names one group under ``results/``, else a one-line DfreError.

    Allowed: letters, digits, ``_``, ``.`` and ``-``; not empty, not ``.`` or ``..``
    (so writing ``results/<run>`` can never replace ``results/`` itself or anything
    outside it).
    """
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run) or run in (".", ".."):
        raise DfreError(
            f"run name {run!r} is not allowed: use letters, digits, '_', '.' and '-' "
            "(not empty, no '/', not '.' or '..'), e.g. --run gfre-ll"
        )
    return run
