"""The exception types the CLI turns into a one-line message and a non-zero exit.

Callers that must react to one kind of failure catch its subclass; nothing routes on message text.
"""


class ApctlError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched checkpoint.

    The message must be one line that says what is wrong, where, and how to fix it.
    The CLI prints it without a traceback; everything else is a bug and keeps its traceback.
    """


class MissingFileError(ApctlError):
    """A file apctl needs (data set, teacher, weights, statistics, checkpoint) is not where it looked."""


class WriteError(ApctlError):
    """A file could not be written (disk full, quota, no permission, read-only file system); the
    previous version of the file, if any, is untouched (every write is atomic: `apctl.files`)."""


class RunStopped(ApctlError):
    """Training stopped on a signal (SIGTERM, SIGINT) after saving a checkpoint, or at once on a
    second signal. `exit_code` is the shell's convention for the signal: 128 + its number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class UnsafePickleError(ApctlError):
    """A pickle refused before unpickling: it names a global outside the allowlist, sets attributes on
    one, or names globals that cannot be resolved statically."""


class UnreadablePickleError(ApctlError):
    """Bytes that are not a pickle, or a pickle that is truncated or corrupt."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
