"""User-facing errors.

Every problem a user can fix (bad input file, wrong store, unknown feature set, ...)
is raised as :class:`DfreError` with a one-line message that names the offending
file, structure or array and says what to do. The command line prints that line
and exits with a non-zero status, without a traceback.
"""


class DfreError(Exception):
    """A problem with the user's input, reported as one line by the CLI."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))
