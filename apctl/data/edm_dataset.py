"""Image datasets in the layout EDM's `dataset_tool.py` writes, and plain image folders.

EDM layout (a zip archive — normally uncompressed — or a folder with the same contents):

    00000/img00000000.png      one PNG per image, grouped 1000 per sub-folder
    00000/img00000001.png
    ...
    dataset.json               optional: {"labels": [["00000/img00000000.png", 6], ...]}
                               or {"labels": null} for an unconditional dataset

Images are square, a power of two on a side, all the same size, grayscale (L) or RGB.
Images are ordered by their path inside the archive (sorted, '/' separators); an integer label
is looked up for every image by that path and label_dim = max label + 1, as EDM's training code
does. Vector (non-integer) labels are not supported.

A plain tree of *.png / *.jpg / ... files without `dataset.json` goes through the same loader and
is unconditional. Non-8-bit images are rejected; palette / RGBA / CMYK images are converted to
RGB (alpha dropped), 1-bit / LA to grayscale; if a folder mixes grayscale and RGB images, the
grayscale ones are repeated to 3 channels. Images are never resized: use dataset_tool.py
`--resolution` / `--transform=center-crop` to prepare other data.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from apctl.data.images import ImageData, describe_looked, describe_search_dirs, resolve_data_path
from apctl.errors import ApctlError
from apctl.files import MAX_ARCHIVE_BYTES, MAX_IMAGE_BYTES, MAX_TEXT_BYTES, check_input_file, read_bounded

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
LABELS_FILE = "dataset.json"
# Labels become one-hot vectors of max label + 1 entries: ImageNet has 1,000 classes; a label of
# 10¹² would make every batch a terabyte.
MAX_CLASSES = 100_000
_FIX_EDM = "rebuild it with EDM's dataset_tool.py"


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _is_image(rel: str) -> bool:
    return os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


class _Source:
    """Read-only access to the files of a zip archive or a folder by '/'-separated relative path."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.files = sorted(
                Path(os.path.relpath(os.path.join(root, f), path)).as_posix()
                for root, _dirs, files in os.walk(path) for f in files
            )
        else:
            check_input_file(path, MAX_ARCHIVE_BYTES, what)      # a FIFO would block ZipFile for ever
            try:
                self._zip = zipfile.ZipFile(path)
                self.files = sorted(n for n in self._zip.namelist() if not n.endswith("/"))
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
                raise ApctlError(f"{what} {path} is neither a folder nor a readable zip archive "
                                 f"({_reason(exc)}); point to the zip or folder written by EDM's "
                                 f"dataset_tool.py, or to a folder of images") from None

    def read(self, rel: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
        """The bytes of one member, at most `limit` (a zip member's declared size is checked first and
        the inflation capped, so a zip bomb cannot exhaust memory; a folder's entry must be a regular file)."""
        try:
            if self._zip is not None:
                info = self._zip.getinfo(rel)
                if info.file_size > limit:
                    raise ApctlError(f"{rel} in {self.what} {self.path} declares {info.file_size:,} bytes, more "
                                     f"than the {limit:,} apctl reads for one file")
                with self._zip.open(info) as member:
                    data = member.read(limit + 1)
                if len(data) > limit:
                    raise ApctlError(f"{rel} in {self.what} {self.path} inflates beyond {limit:,} bytes")
                return data
            return read_bounded(self.path / rel, limit, f"{rel} in {self.what}")
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
            raise ApctlError(f"cannot read {rel} from {self.what} {self.path} ({_reason(exc)}); "
                             f"the file is damaged — {_FIX_EDM} or re-copy it") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------- labels

def _read_labels(source: _Source, names: list[str]) -> np.ndarray | None:
    """Integer labels for `names` from dataset.json, or None when it is absent or says null."""
    if LABELS_FILE not in source.files:
        return None
    where = f"{LABELS_FILE} in {source.what} {source.path}"
    try:
        meta = json.loads(source.read(LABELS_FILE, MAX_TEXT_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _reason(exc)
        raise ApctlError(f"{where} is not valid JSON ({reason}); fix or delete it "
                         f"(without it the dataset is unconditional)") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ApctlError(f"{where} has no \"labels\" entry; expected "
                         f"{{\"labels\": [[\"00000/img00000000.png\", 6], ...]}} or {{\"labels\": null}}")
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ApctlError(f"{where}: \"labels\" is a {type(entries).__name__}, expected a list of "
                         f"[path, integer class] pairs or null")
    table: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ApctlError(f"{where}: label entry {json.dumps(entry)[:80]} is not a [path, class] pair; "
                             f"expected [\"00000/img00000000.png\", 6]")
        value = entry[1]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ApctlError(f"{where}: label of {entry[0]} is {json.dumps(value)[:80]}; only integer class "
                             f"labels are supported (vector labels are not)")
        if not 0 <= value < MAX_CLASSES:
            raise ApctlError(f"{where}: label of {entry[0]} is {value}; class labels must lie in 0…{MAX_CLASSES - 1} "
                             f"(one-hot labels of that many classes are what the networks take)")
        table[entry[0].replace("\\", "/")] = int(value)
    missing = [n for n in names if n not in table]
    if missing:
        raise ApctlError(f"{where} has no label for {missing[0]} ({len(missing)} of {len(names)} images "
                         f"unlabelled); {_FIX_EDM}, or set \"labels\" to null for an unconditional dataset")
    return np.asarray([table[n] for n in names], dtype=np.int64)


# ------------------------------------------------------------------------- images

def _decode(data: bytes, rel: str, source: _Source) -> np.ndarray:
    """One image as uint8 (C, H, W), C ∈ {1, 3}."""
    import PIL.Image

    where = f"{rel} in {source.what} {source.path}"
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode in ("I", "F") or mode.startswith("I;"):
                raise ApctlError(f"image {where} has {mode} pixels (16-bit or float); only 8-bit grayscale "
                                 f"or RGB images are supported — convert it to 8 bits")
            if mode not in ("L", "RGB"):
                img = img.convert("L" if mode in ("1", "LA", "La") else "RGB")
            array = np.asarray(img, dtype=np.uint8)
    except ApctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ApctlError(f"cannot decode image {where} ({_reason(exc)}); the file is corrupt or truncated — "
                         f"delete or replace it, or {_FIX_EDM}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array.transpose(2, 0, 1)


def _iter_images(source: _Source, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for rel in names:
        yield rel, _decode(source.read(rel), rel, source)


def load_edm_dataset(path: str | os.PathLike | None, *, use_labels: bool = True,
                     what: str = "EDM dataset") -> ImageData:
    """Load a dataset_tool.py zip/folder (or a plain image folder) into memory.

    path: the .zip or folder; a relative path that does not exist is also looked for in
          $APCTL_DATA and ~/.cache/apctl/data.
    use_labels: False ignores dataset.json (label_dim 0).
    what: how the dataset is called in error messages.
    """
    if path is None:
        raise ApctlError(f"no path given for the {what}: pass the .zip or folder written by EDM's dataset_tool.py "
                         f"(or a folder of images); relative paths are also looked for in {describe_search_dirs()}")
    found, looked = resolve_data_path(path)
    if found is None:
        raise ApctlError(f"{what} not found: {path} does not exist{describe_looked(looked)}; check the path, "
                         f"or create the dataset with EDM's dataset_tool.py --source=... --dest={path}")
    found = found.resolve()
    source = _Source(found, what)
    try:
        names = [n for n in source.files if _is_image(n) and not _is_hidden(n)]
        if not names:
            raise ApctlError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {what} {found}; "
                             f"point to the zip or folder written by EDM's dataset_tool.py")
        labels = _read_labels(source, names) if use_labels else None

        images: np.ndarray | None = None
        first = ""
        for i, (rel, img) in enumerate(_iter_images(source, names)):
            c, h, w = img.shape
            if images is None:
                if h != w or w & (w - 1) != 0:
                    side = 1 << (max(1, min(h, w)).bit_length() - 1)  # largest power of two that fits
                    raise ApctlError(f"image {rel} in {what} {found} is {w}x{h}; images must be square with a "
                                     f"power-of-two side — convert with EDM's dataset_tool.py "
                                     f"--resolution={side}x{side} --transform=center-crop")
                images = np.empty((len(names), c, h, w), dtype=np.uint8)
                first = rel
            elif (h, w) != images.shape[2:]:
                side = images.shape[2]
                raise ApctlError(f"image {rel} in {what} {found} is {w}x{h} but {first} is {side}x{side}; "
                                 f"all images must have one size — rebuild with dataset_tool.py "
                                 f"--resolution={side}x{side}")
            if c != images.shape[1]:  # mixed grayscale and RGB: promote everything to RGB
                if c == 1:
                    img = np.repeat(img, 3, axis=0)
                else:
                    images = np.repeat(images, 3, axis=1)
            images[i] = img
    finally:
        source.close()
    assert images is not None
    label_dim = int(labels.max()) + 1 if labels is not None else 0
    name = found.stem if found.is_file() else found.name
    return ImageData(images=images, labels=labels, label_dim=label_dim, name=name, source=str(found))


def describe_edm_dataset(path: str | os.PathLike, *, use_labels: bool = True,
                         what: str = "EDM dataset") -> tuple[Path, int, tuple[int, int, int], int]:
    """(resolved path, image count, first image's (C, H, W), label count) of a dataset_tool.py zip/folder or an
    image folder, reading its file list, dataset.json and one image only (the `--dry-run` plan).
    A missing path raises ApctlError as `load_edm_dataset` does."""
    found, looked = resolve_data_path(path)
    if found is None:
        raise ApctlError(f"{what} not found: {path} does not exist{describe_looked(looked)}")
    found = found.resolve()
    source = _Source(found, what)
    try:
        names = [n for n in source.files if _is_image(n) and not _is_hidden(n)]
        if not names:
            raise ApctlError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {what} {found}")
        labels = _read_labels(source, names) if use_labels else None
        shape = tuple(_decode(source.read(names[0]), names[0], source).shape)
    finally:
        source.close()
    return found, len(names), shape, int(labels.max()) + 1 if labels is not None else 0


def load_image_folder(path: str | os.PathLike | None, *, use_labels: bool = True) -> ImageData:
    """A tree of images (or a zip of one); labels only if it has an EDM dataset.json."""
    return load_edm_dataset(path, use_labels=use_labels, what="image folder")
