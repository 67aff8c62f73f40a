"""Where a run may live, and leaving no trace when a fresh run fails.

`check_run_directory(path)` refuses, before anything is read or written, a run directory that cannot
be one: an existing file, a device (`/dev/null`), anything under the kernel's pseudo file systems
(`/proc`, `/sys`, `/dev`), or a path whose nearest existing ancestor is not a writable folder.

`NewEntries` remembers what a run directory held before a run started writing into it; if the run
fails before its first checkpoint, `discard()` removes everything the run added (the directory
itself when the run created it), so a failed fresh run leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from apctl.errors import ApctlError

PSEUDO_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def check_run_directory(path: Path) -> None:
    """One-line ApctlError unless `path` is, or can become, an ordinary run directory."""
    text = str(path)
    if not text.strip():
        raise ApctlError("the run directory is empty; pass --out DIR (or set run.name)")
    resolved = Path(os.path.abspath(path)).resolve()
    for root in PSEUDO_FILE_SYSTEMS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise ApctlError(f"{path} is inside {root}, a kernel file system, not a place for a run directory")
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise ApctlError(f"cannot use {path} as a run directory: {exc.strerror or exc}") from None
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            kind = "a file" if stat.S_ISREG(info.st_mode) else "not a folder"
            raise ApctlError(f"{path} is {kind}; --out names a run directory (a folder)")
        if not os.access(resolved, os.W_OK | os.X_OK):
            raise ApctlError(f"{path} is not writable by this user")
        return
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ApctlError(f"cannot create {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ApctlError(f"cannot create {path}: {ancestor} is not writable by this user")


class NewEntries:
    """What a run added to its directory since `NewEntries(run_dir)` was taken (call before any write)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.existed = self.run_dir.is_dir()
        self.before = set(os.listdir(self.run_dir)) if self.existed else set()

    def discard(self) -> None:
        """Remove what the run added: the whole directory if it created it, else the new entries."""
        if not self.run_dir.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for name in set(os.listdir(self.run_dir)) - self.before:
            entry = self.run_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
