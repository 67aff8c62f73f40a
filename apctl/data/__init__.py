"""Image datasets for distillation, all loaded fully into memory as uint8 `ImageData`.

    load_image_data("cifar10", "~/data/cifar-10-python.tar.gz")
    load_image_data("edm", "datasets/cifar10-32x32.zip")
    load_image_data("folder", "my_pngs/")
    load_image_data("digits", None, resolution=16)

Kinds and their options:

    cifar10  path: cifar-10-python.tar.gz, cifar-10-batches-py/, or a folder with either
             (None: search $APCTL_DATA and ~/.cache/apctl/data); split="train"|"test"|"all",
             use_labels=True
    edm      path: zip or folder written by EDM's dataset_tool.py; use_labels=True
    folder   path: a tree of images (labels only from an EDM dataset.json); use_labels=True
    digits   no path (scikit-learn's bundled 8×8 digits); resolution=8|16|32,
             upsample="bilinear"|"nearest", use_labels=True
"""

from __future__ import annotations

import os
from typing import Any, Callable

from apctl.data.cifar10 import load_cifar10
from apctl.data.digits import load_digits
from apctl.data.edm_dataset import load_edm_dataset, load_image_folder
from apctl.data.images import ImageData, data_search_dirs
from apctl.errors import ApctlError

KINDS = ("cifar10", "edm", "folder", "digits")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "cifar10": ("split", "use_labels"),
    "edm": ("use_labels",),
    "folder": ("use_labels",),
    "digits": ("resolution", "upsample", "use_labels"),
}


def _load_digits(path: str | os.PathLike | None, **options: Any) -> ImageData:
    if path is not None:
        raise ApctlError(f"the digits dataset is bundled with scikit-learn and takes no path (got {path}); "
                         f"remove the data path, or choose another dataset kind ({', '.join(KINDS)})")
    return load_digits(**options)


_LOADERS: dict[str, Callable[..., ImageData]] = {
    "cifar10": load_cifar10,
    "edm": load_edm_dataset,
    "folder": load_image_folder,
    "digits": _load_digits,
}


def infer_data_kind(path: str | os.PathLike) -> str:
    """The data-set kind a path looks like: a CIFAR-10 archive or folder, an EDM zip/folder, or images."""
    from pathlib import Path

    p = Path(path)
    if p.name.endswith((".tar.gz", ".tgz")) or "cifar-10" in p.name or (p / "cifar-10-batches-py").is_dir() \
            or (p / "data_batch_1").is_file():
        return "cifar10"
    if p.suffix == ".zip" or (p / "dataset.json").is_file():
        return "edm"
    return "folder"


def load_image_data(kind: str, path: str | os.PathLike | None = None, **options: Any) -> ImageData:
    """Load dataset `kind` ∈ {'cifar10', 'edm', 'folder', 'digits'} from `path` into memory.

    Unknown kinds, unknown options and every problem with the files raise ApctlError (one line).
    """
    if kind not in _LOADERS:
        raise ApctlError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        allowed = ", ".join(_OPTIONS[kind]) or "none"
        raise ApctlError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for dataset kind "
                         f"{kind!r}; allowed: {allowed}")
    return _LOADERS[kind](path, **options)


__all__ = [
    "ImageData",
    "KINDS",
    "data_search_dirs",
    "load_cifar10",
    "load_digits",
    "load_edm_dataset",
    "load_image_data",
    "load_image_folder",
]
