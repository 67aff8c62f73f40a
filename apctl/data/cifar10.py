"""CIFAR-10, python version: `cifar-10-python.tar.gz` or its extracted `cifar-10-batches-py/`.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html): `data_batch_1` … `data_batch_5` (training,
10 000 images each) and `test_batch`. Each is a protocol-2 pickle, written by Python 2, of a dict:

    data         uint8 numpy array (n, 3072): 1024 red, then 1024 green, then 1024 blue values,
                 each plane row-major 32×32 → reshape(n, 3, 32, 32) is NCHW directly
    labels       list of n ints in 0..9
    filenames    list of n names
    batch_label  a string

Python 2 wrote the keys as `str`, so under the latin1 decoding used by `restricted_load` they come
back as `str`; a batch re-pickled by Python 3 has `bytes` keys. Both are accepted.

The pickles are loaded with `apctl.safe_pickle.restricted_load`, allowing only the globals a
numpy array needs; the tarball is read in one streaming pass, never extracted to disk.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from apctl.data.images import (ImageData, data_search_dirs, describe_looked, describe_search_dirs,
                               resolve_data_path)
from apctl.errors import ApctlError, UnreadablePickleError, UnsafePickleError
from apctl.files import MAX_ARCHIVE_BYTES, check_input_file, read_bounded
from apctl.safe_pickle import numpy_array_allowlist, restricted_load

TARBALL_NAME = "cifar-10-python.tar.gz"
BATCH_DIR_NAME = "cifar-10-batches-py"
DOWNLOAD_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# A real batch pickle is ~31 MB; anything far bigger is not a CIFAR-10 batch.
_MAX_MEMBER_BYTES = 256 * 1024 * 1024


def _numpy_allowlist() -> dict[tuple[str, str], Any]:
    import _codecs  # Python 2 wrote some byte strings as _codecs.encode(text, 'latin1')

    return {**numpy_array_allowlist(), ("_codecs", "encode"): _codecs.encode}


def _batch_names(split: str) -> tuple[str, ...]:
    if split == "train":
        return TRAIN_BATCHES
    if split == "test":
        return (TEST_BATCH,)
    if split == "all":
        return TRAIN_BATCHES + (TEST_BATCH,)
    raise ApctlError(f"unknown CIFAR-10 split {split!r}; use one of {', '.join(SPLITS)}")


_HOW_TO_GET = f"download {TARBALL_NAME} (python version) from {DOWNLOAD_PAGE} on a machine with internet"


def _locate_in_dir(folder: Path) -> Path | None:
    """The batches folder or tarball inside `folder` (which may itself be the batches folder)."""
    if (folder / TRAIN_BATCHES[0]).is_file() or (folder / TEST_BATCH).is_file():
        return folder
    if (folder / BATCH_DIR_NAME).is_dir():
        return folder / BATCH_DIR_NAME
    if (folder / TARBALL_NAME).is_file():
        return folder / TARBALL_NAME
    return None


def find_cifar10(path: str | os.PathLike | None = None) -> Path:
    """Resolve `path` (tarball, batches folder, or a folder holding either) or search the data folders."""
    if path is not None:
        found, looked = resolve_data_path(path)
        if found is None:
            raise ApctlError(
                f"CIFAR-10 not found: {path} does not exist{describe_looked(looked)}; without a path, "
                f"{TARBALL_NAME} or {BATCH_DIR_NAME}/ is looked for in {describe_search_dirs()}; {_HOW_TO_GET}, "
                f"then pass its path or copy it into one of those folders"
            )
        if found.is_dir():
            located = _locate_in_dir(found)
            if located is None:
                raise ApctlError(
                    f"CIFAR-10 not found: folder {found} holds neither {TARBALL_NAME} nor {BATCH_DIR_NAME}/ nor "
                    f"data_batch_1..5; point to the tarball or its extracted folder, or {_HOW_TO_GET} and put it there"
                )
            return located
        return found
    for _label, folder in data_search_dirs():
        if folder is not None and folder.is_dir():
            located = _locate_in_dir(folder)
            if located is not None:
                return located
    raise ApctlError(
        f"CIFAR-10 not found: no path given, and neither {TARBALL_NAME} nor {BATCH_DIR_NAME}/ is in "
        f"{describe_search_dirs()}; {_HOW_TO_GET}, then pass its path or copy it into one of those folders"
    )


# ------------------------------------------------------------------------- reading batches

def _read_from_dir(folder: Path, names: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    for name in names:
        file = folder / name
        if not file.is_file():
            raise ApctlError(
                f"CIFAR-10 folder {folder} is missing {name}; the extraction is incomplete — "
                f"re-extract {TARBALL_NAME} (download from {DOWNLOAD_PAGE})"
            )
        size = file.stat().st_size
        if size > _MAX_MEMBER_BYTES:
            raise ApctlError(f"{file} is {size} bytes, far larger than a CIFAR-10 batch; "
                             f"replace it with the file from {TARBALL_NAME}")
        yield name, read_bounded(file, _MAX_MEMBER_BYTES, "CIFAR-10 batch")


def _read_from_tar(tarball: Path, names: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    """Yield the wanted members, in archive order, from one streaming pass (no extraction, no seeking)."""
    wanted = set(names)
    seen: set[str] = set()
    try:
        with tarfile.open(tarball, mode="r|gz") as tar:
            for member in tar:
                base = member.name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
                if base not in wanted or base in seen or not member.isfile():
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    raise ApctlError(f"{tarball}: member {member.name} is {member.size} bytes, far larger "
                                     f"than a CIFAR-10 batch; re-download {TARBALL_NAME} from {DOWNLOAD_PAGE}")
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - isfile() members always have data
                    continue
                data = handle.read()
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} is cut short")
                seen.add(base)
                yield base, data
                del data
                if len(seen) == len(wanted):
                    break
    except ApctlError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        reason = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise ApctlError(
            f"{tarball} is not a readable CIFAR-10 tarball ({reason}); it is truncated or corrupt — "
            f"re-download {TARBALL_NAME} (python version) from {DOWNLOAD_PAGE}"
        ) from None
    missing = [n for n in names if n not in seen]
    if missing:
        raise ApctlError(
            f"{tarball} has no {BATCH_DIR_NAME}/{missing[0]}"
            f"{f' (nor {len(missing) - 1} more batches)' if len(missing) > 1 else ''}; it is not the "
            f"CIFAR-10 python version or is incomplete — re-download {TARBALL_NAME} from {DOWNLOAD_PAGE}"
        )


def _field(batch: dict, key: str) -> Any:
    for k in (key, key.encode("ascii")):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) from one batch pickle."""
    fix = f"replace it with the one from {TARBALL_NAME} (download from {DOWNLOAD_PAGE})"
    try:
        batch = restricted_load(raw, _numpy_allowlist(), what=f"CIFAR-10 batch {where}")
    except (UnsafePickleError, UnreadablePickleError) as exc:  # their messages name `where` already
        raise type(exc)(f"{exc}; {fix}") from None
    if not isinstance(batch, dict):
        raise ApctlError(f"CIFAR-10 batch {where} holds a {type(batch).__name__}, not a dict; {fix}")
    try:
        data = _field(batch, "data")
        labels = _field(batch, "labels")
    except KeyError as exc:
        raise ApctlError(f"CIFAR-10 batch {where} has no '{exc.args[0]}' entry; {fix}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ApctlError(f"CIFAR-10 batch {where}: 'data' is {desc}, expected uint8 (n, 3072); {fix}")
    try:
        label_array = np.asarray(labels)
    except Exception:  # noqa: BLE001 - anything unconvertible is a malformed file
        label_array = np.asarray([], dtype=object)
    if label_array.ndim != 1 or (label_array.size and not np.issubdtype(label_array.dtype, np.integer)):
        raise ApctlError(f"CIFAR-10 batch {where}: 'labels' is not a list of integers; {fix}")
    if label_array.shape[0] != data.shape[0]:
        raise ApctlError(f"CIFAR-10 batch {where} has {data.shape[0]} images but {label_array.shape[0]} labels; {fix}")
    if data.shape[0] == 0:
        raise ApctlError(f"CIFAR-10 batch {where} holds no images; {fix}")
    if label_array.min() < 0 or label_array.max() >= NUM_CLASSES:
        raise ApctlError(f"CIFAR-10 batch {where} has labels outside 0..{NUM_CLASSES - 1} "
                         f"(min {label_array.min()}, max {label_array.max()}); {fix}")
    return data.reshape(-1, 3, 32, 32), label_array.astype(np.int64)


def load_cifar10(path: str | os.PathLike | None = None, *, split: str = "train",
                 use_labels: bool = True) -> ImageData:
    """Load CIFAR-10 into memory as uint8 (N, 3, 32, 32) with labels 0..9 (label_dim 10).

    path:  `cifar-10-python.tar.gz`, the extracted `cifar-10-batches-py/`, or a folder holding
           either; None searches $APCTL_DATA and ~/.cache/apctl/data.
    split: "train" (data_batch_1..5, 50 000 images), "test" (test_batch, 10 000) or "all" (both,
           train first).
    use_labels: False drops the labels (label_dim 0, unconditional).
    """
    names = _batch_names(split)
    location = find_cifar10(path)
    if location.is_dir():
        members = _read_from_dir(location, names)
        where = lambda n: str(location / n)  # noqa: E731
    else:
        check_input_file(location, MAX_ARCHIVE_BYTES, "CIFAR-10 archive")     # a FIFO would block tarfile
        members = _read_from_tar(location, names)
        where = lambda n: f"{location}:{BATCH_DIR_NAME}/{n}"  # noqa: E731
    parsed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, raw in members:  # parse each batch as it arrives: only one raw pickle in memory at a time
        parsed[name] = _parse_batch(raw, where(name))
        del raw
    all_images = np.concatenate([parsed[n][0] for n in names])
    all_labels = np.concatenate([parsed[n][1] for n in names])
    del parsed
    return ImageData(
        images=all_images,
        labels=all_labels if use_labels else None,
        label_dim=NUM_CLASSES if use_labels else 0,
        name="cifar10" if split == "train" else f"cifar10-{split}",
        source=str(location),
    )
