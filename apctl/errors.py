"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ApctlError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched checkpoint.

    The message must be one line that says what is wrong, where, and how to fix it.
    The CLI prints it without a traceback; everything else is a bug and keeps its traceback.
    """
