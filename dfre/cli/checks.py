"""Checks of the parsed command line that every command shares, run before its handler.

:func:`check_arguments` runs in the main process before any store is locked, any file
is written or any cluster starts: every numeric option must lie in its range (a
negative thread count would otherwise only fail on a worker, after the store was
changed), and a results name must name one group under ``results/``. Options that a
command checks itself with its own message are listed in :data:`CHECKED_BY_COMMAND`.
"""

from __future__ import annotations

import argparse
import math

from dfre.errors import DfreError
from dfre.names import RUN_NAME, check_run_name

#: Numeric options by argparse ``dest``: (smallest allowed value, whether it may equal it).
RANGES: dict[str, tuple[float, bool]] = {
    "torch_threads": (1, True),
    "prefetch": (0, True),
    "graph_processes": (0, True),
    "seed": (0, True),
    "max_structures": (1, True),
    "wait": (1, True),
    "wait_timeout": (0, False),
    "scheduler_timeout": (0, False),
    "worker_timeout": (0, True),
    "check_every": (0, False),
    "max_job_failures": (1, True),
    "epochs": (-math.inf, False),
    "min_distance": (0, True),
    "min_count": (1, True),
}
#: Numeric options whose command checks them with its own message.
CHECKED_BY_COMMAND = {
    "atoms",  # sample, demo
    "batch_atoms",  # featurize (dfre.featurize.check_settings)
    "chunk_atoms",  # ingest, sample
    "workers",  # the cluster options and cluster start
    "order",  # cumulants (check_order)
    "components",  # pcovr
    "max_fit",  # pcovr
    "mixing",  # pcovr
}
#: Options holding a results name, or the prefix of results names.
RUN_OPTIONS = ("run", "run_prefix")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_number(dest: str, value: float) -> None:
    low, inclusive = RANGES[dest]
    if isinstance(value, float) and math.isnan(value):
        raise DfreError(f"{_flag(dest)} must be a number, got nan")
    if math.isinf(low):
        if not math.isfinite(value):
            raise DfreError(f"{_flag(dest)} must be a finite number, got {value}")
        return
    if value < low or (value == low and not inclusive):
        relation = ">=" if inclusive else ">"
        shown = int(low) if float(low).is_integer() else low
        raise DfreError(f"{_flag(dest)} must be {relation} {shown}, got {value}")


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for out-of-range numbers and bad results names in ``args``."""
    for dest, value in vars(args).items():
        if dest not in RANGES or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            _check_number(dest, item)
    for dest in RUN_OPTIONS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "run_prefix":  # the start of names like <prefix>gfre-checkpoints
            if value and not RUN_NAME.fullmatch(value):
                raise DfreError(
                    f"--run-prefix {value!r} is not allowed: use letters, digits, '_', '.' "
                    "and '-' (no '/')"
                )
        else:
            for name in value if isinstance(value, list) else [value]:
                check_run_name(name)
