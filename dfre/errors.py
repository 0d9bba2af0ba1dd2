"""User-facing errors.

Every problem a user can fix (bad input file, wrong store, unknown feature set, ...)
is raised as :class:`DfreError` with a one-line message that names the offending
file, structure or array and says what to do. The command line prints that line
and exits with a non-zero status, without a traceback.
"""

import difflib
from collections.abc import Iterable


class DfreError(Exception):
    """A problem with the user's input, reported as one line by the CLI."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the known name closest to a mistyped ``name``, else ``""``.

    Closeness is difflib's ratio (at least 0.6), as in Python's own suggestions.
    """
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
