"""FID reference statistics of a whole data set, in EDM's `.npz` layout (`apctl eval ref`).

Every image goes through the Inception network once (batch by batch, on its device); the moments
are accumulated in float64 as EDM's `fid.py` does,

    μ = Σ x / n,    Σ = (Σ x xᵀ − n μ μᵀ) / (n − 1),

so memory stays at one 2048² matrix for any n. The file holds `mu` (2048,) and `sigma` (2048, 2048)
— what EDM's reference files hold and what any EDM-layout reader needs — plus `num_images` and, for
KID, `features`: the pool3 features (float32) of up to `kid_images` images drawn without replacement
with seed 0 (all of them for a smaller set). No flips, no labels: the images as stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from apctl.errors import ApctlError
from apctl.files import atomic_path


class MomentAccumulator:
    """Running Σx and Σxxᵀ of d-dimensional rows in float64, and the μ, Σ they give."""

    def __init__(self, dim: int):
        self.n = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, np.float64)
        self.n += len(x)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def statistics(self) -> dict[str, np.ndarray]:
        if self.n < 2:
            raise ApctlError(f"reference statistics need at least 2 images, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return {"mu": mu, "sigma": (sigma + sigma.T) / 2}


def kid_subset(n: int, kid_images: int) -> np.ndarray:
    """Sorted indices of the images whose features are kept for KID: `kid_images` of n drawn with seed 0."""
    if kid_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:kid_images])


def dataset_statistics(images, detector, batch_size: int = 64, kid_images: int = 5000,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray | int]:
    """{'mu', 'sigma', 'num_images'[, 'features']} of uint8 (N, C, H, W) `images` (an array or anything sliceable)."""
    n = len(images)
    if n < 2:
        raise ApctlError(f"reference statistics need at least 2 images, got {n}")
    keep = np.zeros(n, bool)
    keep[kid_subset(n, kid_images)] = kid_images > 0
    moments, kept = None, []
    if progress is not None:
        progress(0, n)
    for a in range(0, n, batch_size):
        feats = detector.features(images[a:a + batch_size], batch_size)["2048"]
        if moments is None:
            moments = MomentAccumulator(feats.shape[1])
        moments.add(feats)
        kept.append(feats[keep[a:a + batch_size]].astype(np.float32))
        if progress is not None:
            progress(min(a + batch_size, n), n)
    out: dict = {**moments.statistics(), "num_images": n}
    if kid_images > 0:
        out["features"] = np.concatenate(kept)
    return out


def save_dataset_statistics(path: str | os.PathLike, stats: dict) -> Path:
    """Write the statistics (mu, sigma float64; num_images; features float32 when present) atomically."""
    path = Path(path)
    arrays = {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64),
              "num_images": np.asarray(stats["num_images"], np.int64)}
    if "features" in stats:
        arrays["features"] = np.asarray(stats["features"], np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no suffix to it
        np.savez(f, **arrays)
    return path


def load_reference_extras(path: str | os.PathLike) -> dict:
    """What an `apctl eval ref` file adds to EDM's layout: {'num_images'?, 'features'?} (empty for EDM's files)."""
    out: dict = {}
    with np.load(Path(path).expanduser(), allow_pickle=False) as data:
        if "num_images" in data.files:
            out["num_images"] = int(data["num_images"])
        if "features" in data.files:
            feats = np.asarray(data["features"], np.float64)
            if feats.ndim != 2 or feats.shape[1] != len(data["mu"]):
                raise ApctlError(f"FID reference {path} has features of shape {feats.shape}, expected (m, {len(data['mu'])})")
            out["features"] = feats
    return out
