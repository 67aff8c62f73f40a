"""`ImageData`: an in-memory image dataset (uint8 NCHW + optional integer class labels).

Every loader in `apctl.data` returns one of these. Pixels stay uint8 in memory (CIFAR-10 train is
50 000 × 3 × 32 × 32 = 150 MB) and are converted to float32 in [-1, 1] per batch, the range EDM
teachers are trained on (x / 127.5 − 1).

Also holds the few helpers the loaders share: where datasets are looked for when no path is given
(`data_search_dirs`) and how a path is resolved against those folders (`resolve_data_path`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from apctl.files import CACHE_ROOT, cache_dir, env_dirs

Indices = Union[None, int, slice, Sequence[int], np.ndarray, torch.Tensor]

DEFAULT_DATA_DIR = f"{CACHE_ROOT}/data"
DATA_ENV_VAR = "APCTL_DATA"


@dataclass(eq=False)
class ImageData:
    """Images and labels held in memory.

    images:    uint8 numpy array (N, C, H, W), C ∈ {1, 3}.
    labels:    int64 numpy array (N,) with values in [0, label_dim), or None when unconditional.
    label_dim: number of classes; 0 exactly when `labels` is None.
    name:      short dataset name ("cifar10", "digits", the zip/folder stem, ...).
    source:    where the data came from (a path, or a description for bundled data).
    """

    images: np.ndarray
    labels: np.ndarray | None
    label_dim: int
    name: str
    source: str

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"ImageData.images must be a uint8 array (N, C, H, W), got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"ImageData.images must have 1 or 3 channels, got shape {images.shape}")
        self.label_dim = int(self.label_dim)
        if self.labels is None:
            if self.label_dim != 0:
                raise ValueError("ImageData.label_dim must be 0 when labels is None")
        else:
            labels = np.asarray(self.labels)
            if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"ImageData.labels must be an integer array ({images.shape[0]},), "
                                 f"got {labels.dtype} {labels.shape}")
            labels = labels.astype(np.int64, copy=False)
            if self.label_dim <= 0:
                raise ValueError("ImageData.label_dim must be positive when labels are given")
            if labels.size and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise ValueError(f"ImageData.labels must lie in [0, {self.label_dim})")
            self.labels = labels

    # ---------------------------------------------------------------- shape information

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    # ---------------------------------------------------------------- batches

    def _index(self, indices: Indices) -> np.ndarray | slice:
        if indices is None:
            return slice(None)
        if isinstance(indices, slice):
            return indices
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        return idx.astype(np.int64, copy=False)

    def to_tensor(self, indices: Indices = None) -> torch.Tensor:
        """Images at `indices` as float32 (B, C, H, W) in [-1, 1] (x / 127.5 − 1).

        `indices`: None (all), an int, a slice, a sequence, a numpy array or a torch tensor.
        """
        return _to_float(np.ascontiguousarray(self.images[self._index(indices)]))

    def one_hot(self, indices: Indices = None) -> torch.Tensor | None:
        """One-hot labels at `indices` as float32 (B, label_dim), or None when unconditional."""
        if self.labels is None:
            return None
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[self._index(indices)]))
        return torch.nn.functional.one_hot(labels, num_classes=self.label_dim).to(torch.float32)

    def sample_batch(self, generator, batch_size: int, xflip: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random batch: (images float32 (B, C, H, W) in [-1, 1], one-hot labels (B, label_dim) or None).

        Indices are drawn uniformly with replacement from `generator` (a CPU torch.Generator, or a
        training step's per-sample draws, apctl/draws.py); with `xflip`, each image is then mirrored
        left-right with probability 1/2, using a second draw from the same generator. The result
        depends only on the generator state, and the indices are the same whether xflip is on or off
        (the flip draw comes after them).
        """
        from apctl.draws import as_draws

        if len(self) == 0:
            raise ValueError("cannot sample from an empty dataset")
        draws = as_draws(generator, int(batch_size))
        idx = draws.randint(len(self))
        batch = np.ascontiguousarray(self.images[idx.numpy()])
        if xflip:
            flip = (draws.rand() < 0.5).numpy()
            batch[flip] = batch[flip][..., ::-1]
        return _to_float(batch), self.one_hot(idx)


def _to_float(batch: np.ndarray) -> torch.Tensor:
    """uint8 → float32 x / 127.5 − 1, computed in numpy: same values as torch's float32 ops, but free of
    torch intra-op thread start-up, which costs tens of ms per batch on a busy 2-core machine."""
    out = batch.astype(np.float32)
    np.divide(out, np.float32(127.5), out=out)
    np.subtract(out, np.float32(1.0), out=out)
    return torch.from_numpy(out)


# -------------------------------------------------------------------- shared loader helpers

def data_search_dirs() -> list[tuple[str, Path | None]]:
    """Where datasets are looked for, in order, as (label for messages, folder or None if unset).

    `$APCTL_DATA` (may list several folders separated by os.pathsep), then ~/.cache/apctl/data.
    """
    label = f"${DATA_ENV_VAR}"
    dirs: list[tuple[str, Path | None]] = [(label, d) for d in env_dirs(DATA_ENV_VAR)] or [(label, None)]
    return dirs + [(DEFAULT_DATA_DIR, cache_dir("data"))]


def describe_search_dirs() -> str:
    """'$APCTL_DATA (not set), ~/.cache/apctl/data (/root/.cache/apctl/data)' for messages."""
    parts = []
    for label, folder in data_search_dirs():
        parts.append(f"{label} (not set)" if folder is None else f"{label} ({folder})")
    return ", ".join(parts)


def resolve_data_path(path: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """Find `path`: as given, then (if relative) inside each data search folder.

    Returns (the existing path or None, the places looked in, for an error message).
    """
    given = Path(os.fspath(path)).expanduser()
    looked = [str(given.absolute())]
    if given.exists():
        return given, looked
    if not given.is_absolute():
        for label, folder in data_search_dirs():
            if folder is None:
                looked.append(f"{label} (not set)")
                continue
            candidate = folder / given
            looked.append(f"{candidate} (in {label})")
            if candidate.exists():
                return candidate, looked
    return None, looked


def describe_looked(looked: list[str]) -> str:
    """' (looked at a; b; c)' when a relative path was searched in several places, else ''."""
    return f" (looked at {'; '.join(looked)})" if len(looked) > 1 else ""
