"""Pictures of samples: scatter plots for 2-D data, image grids for images."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from apctl.files import atomic_write


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] → one (rows·H, cols·W, C) uint8 mosaic, row-major, ⌈√B⌉ columns by default,
    unused cells black."""
    import torch
    from torchvision.utils import make_grid

    images = np.clip((np.asarray(images, dtype=np.float64) + 1) * 127.5, 0, 255).astype(np.uint8)
    channels = images.shape[1]
    cols = columns or int(math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(torch.from_numpy(images), nrow=cols, padding=0)  # grey comes back as 3 equal channels
    return grid[:channels].permute(1, 2, 0).numpy()


def plot_samples(samples: np.ndarray, path: str | Path, reference: np.ndarray | None = None, title: str = "") -> None:
    """Scatter (2-D data, teacher reference in grey) or an image grid (C, H, W data), written to `path`."""
    plt = _mpl()
    samples = np.asarray(samples)
    if samples.ndim == 4:
        grid = image_grid(samples[:64])
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None)
        ax.axis("off")
    else:
        flat = samples.reshape(samples.shape[0], -1)
        fig, ax = plt.subplots(figsize=(6, 6))
        if reference is not None:
            ref = np.asarray(reference).reshape(len(reference), -1)
            ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.7", label="teacher")
        ax.scatter(flat[:, 0], flat[:, 1], s=3, c="C0", label="student")
        ax.set_aspect("equal")
        if reference is not None:
            ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    picture = io.BytesIO()
    fig.savefig(picture, format=Path(path).suffix[1:] or "png", dpi=100)
    plt.close(fig)
    atomic_write(path, picture.getvalue())
