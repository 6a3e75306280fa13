"""User-facing errors.

Anything a user can cause (bad file, bad prompt, wrong model) raises `DplError`. The CLI turns it
into a one-line message and a non-zero exit code; everything else is a bug and keeps its traceback.
"""


class DplError(Exception):
    """An error caused by user input, reported as one line without a traceback."""


def error_line(exc: DplError) -> str:
    """The one line a user error is reported as, by the CLI and the web app alike."""
    return f"error: {exc}"
