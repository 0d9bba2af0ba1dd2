"""The ``dfre`` command.

Each sub-command lives in its own small module of this package with two functions:
``add_parser(subparsers)`` declares its arguments and ``run(args)`` calls the library.
Errors the user can fix arrive as :class:`dfre.errors.DfreError` and are printed as
one line ``dfre: error: ...`` with exit status 2, never as a traceback; so are failures
of the machine (full disk, read-only or lost file system, corrupted chunks), see
:mod:`dfre.cli.failures`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dfre import __version__
from dfre.cli.checks import check_arguments
from dfre.cli.failures import note_store, store_gone
from dfre.errors import DfreError

#: Modules of ``dfre.cli`` that each define one or more sub-commands, in help order.
COMMAND_MODULES: list[str] = [
    "ingest",
    "sample",
    "info",
    "verify",
    "featurize",
    "models",
    "cumulants",
    "pcovr",
    "report",
    "chemiscope",
    "cluster",
    "gfre",
    "lfre",
    "checkpoints",
    "study",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfre",
        description="Compare the latent features of machine-learning interatomic potentials "
        "on whole datasets: feature extraction, GFRE, LFRE, cumulant descriptors, maps.",
    )
    parser.add_argument("--version", action="version", version=f"dfre {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"dfre.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    note_store(args)
    try:
        check_arguments(args)
        result = args.handler(args)
    except DfreError as error:
        print(f"dfre: error: {store_gone(args) or error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("dfre: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # full disk, lost mount, corrupted chunk: one line, else raise
        from dfre.cli.failures import describe_failure

        message = describe_failure(args, error)
        if message is None:
            raise
        print(f"dfre: error: {' '.join(message.split())}", file=sys.stderr)
        return DfreError.exit_code
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
