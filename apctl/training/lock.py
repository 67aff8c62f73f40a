"""The run lock: one process owns a run directory while it trains.

`<run>/.lock` holds one line of JSON {"pid", "host", "started"} and is held with an exclusive
`fcntl.flock` for as long as the run lives. The kernel drops a flock when its process dies (even by
SIGKILL), so a lock nobody holds is stale by construction: the next run takes it over and says whose
it was. A second writer on a held lock is refused with the holder's pid and host. The file is left
in place, emptied, when the run ends (unlinking a flock'ed file would let two processes lock two
different inodes of the same name).

`check_unlocked` asks the same question without creating or writing anything, so a run can be
refused before it writes a byte; `RunLock.acquire` takes the lock (and creates the directory).
Only rank 0 of a torchrun job writes files, so only rank 0 takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from apctl.errors import ApctlError
from apctl.files import WRITE_ERRNOS, write_error

LOCK_NAME = ".lock"


class RunLockedError(ApctlError):
    """Another live process holds the run directory's lock."""


def _holder(fd: int) -> dict:
    """The lock file's recorded holder ({} when empty or unreadable: a lock being written, or released)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if isinstance(started, (int, float)) else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def _refusal(run_dir: Path, holder: dict) -> RunLockedError:
    return RunLockedError(f"{run_dir} is in use by {_describe(holder)} (lock {run_dir / LOCK_NAME}); "
                          "wait for that run to end, or pass another --out")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def check_unlocked(run_dir: Path) -> None:
    """Refuse (RunLockedError) if a live process holds `run_dir`'s lock; creates and writes nothing."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ApctlError(f"cannot read the run lock {path}: {exc.strerror or exc}") from None
    try:
        if not _try_flock(fd):
            raise _refusal(Path(run_dir), _holder(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunLock:
    """An acquired run lock; `release()` (or the process's death) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, message: Callable[[str], None]) -> "RunLock":
        """Create `run_dir` if needed and take its lock. A held lock raises RunLockedError naming the
        holder; a lock left by a dead process is taken over, and `message` says whose it was."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(path, exc) from None
            raise
        try:
            if not _try_flock(fd):
                raise _refusal(run_dir, _holder(fd))
            previous = _holder(fd)
            if previous:       # written by a process that is gone: the kernel dropped its flock
                message(f"taking over the stale lock of {_describe(previous)}, which is no longer running")
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in WRITE_ERRNOS:
                raise write_error(path, exc) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Empty the lock file (so the next run sees a clean release, not a stale holder) and unlock."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass           # a full or read-only disk: the flock still goes with the close below
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = -1
