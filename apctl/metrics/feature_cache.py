"""Inception features of seeded images, chunk by chunk, kept on disk and shared out over processes.

Images 0 … n−1 (image i from seed i, `apctl.generation`) are cut into chunks of `chunk_size`
consecutive seeds; chunk k goes to rank k mod world (EDM's `generate.py` likewise deals batches
round-robin). A finished chunk's features are written atomically to

    <cache_dir>/chunk-<first seed>-<last seed + 1>.npz     pool3 (m, 2048) float32[, logits (m, 1008)]

so an interrupted evaluation resumes at the first missing chunk, and growing n reuses every full
chunk. Nothing else about a chunk depends on the batch size or on the number of processes, so the
features (and every number computed from them) are the same for any batch and any world size. The
cache directory must be shared by the ranks (one node, or a shared file system): after a barrier,
rank 0 reads every chunk in seed order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from apctl.errors import ApctlError
from apctl.files import atomic_path, atomic_write

DEFAULT_CHUNK = 1000


def protocol_hash(description: dict) -> str:
    """A short stable name for everything that decides the features (generator, weights, detector, chunking)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop)) seed ranges of the chunks covering 0 … n−1."""
    if n < 1 or chunk_size < 1:
        raise ValueError(f"need n ≥ 1 and chunk_size ≥ 1, got {n}, {chunk_size}")
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def chunk_path(cache_dir: Path, start: int, stop: int) -> Path:
    return Path(cache_dir) / f"chunk-{start:07d}-{stop:07d}.npz"


def _read_chunk(path: Path, rows: int) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        out = {k: np.asarray(data[k]) for k in data.files}
    if "pool3" not in out or any(len(v) != rows for v in out.values()):
        raise ApctlError(f"feature cache chunk {path} does not hold {rows} rows of pool3 features; delete it to recompute")
    return out


def cached_features(make_images: Callable[[Sequence[int]], torch.Tensor], detector, n: int, cache_dir: Path,
                    chunk_size: int = DEFAULT_CHUNK, batch_size: int = 64, rank: int = 0, world: int = 1,
                    description: dict | None = None, progress: Callable[[int, int], None] | None = None,
                    on_chunk: Callable[[int, int], None] | None = None, barrier: Callable[[], None] | None = None
                    ) -> dict[str, np.ndarray] | None:
    """Features of images 0 … n−1 as {'pool3': (n, 2048) float64[, 'logits': (n, 1008)]} on rank 0, None elsewhere.

    make_images(seeds) → float images in [−1, 1]; `detector.features(images, batch) → {'2048', ['logits_unbiased']}`
    (`apctl.metrics.inception.InceptionNet`). Images are made `batch_size` seeds at a time. `progress(done, n)`
    is called on rank 0 with the images whose features exist (first with those found in the cache);
    `on_chunk(start, stop)` after each chunk this rank wrote; `barrier()` lets every rank finish before rank 0
    reads. `description` is written beside the chunks as protocol.json (what they are features of).
    """
    cache_dir = Path(cache_dir)
    chunks = chunk_ranges(n, chunk_size)
    if rank == 0 and description is not None and not (cache_dir / "protocol.json").is_file():
        atomic_write(cache_dir / "protocol.json", json.dumps(description, indent=1, default=str))

    def present() -> int:
        return sum(b - a for a, b in chunks if chunk_path(cache_dir, a, b).is_file())

    if progress is not None and rank == 0:
        progress(present(), n)
    for start, stop in chunks[rank::world]:
        path = chunk_path(cache_dir, start, stop)
        if path.is_file():
            continue
        pool, logits = [], []
        for a in range(start, stop, batch_size):
            images = make_images(range(a, min(a + batch_size, stop)))
            feats = detector.features(images, batch_size)
            pool.append(feats["2048"].astype(np.float32))          # the network's own precision: no loss
            if "logits_unbiased" in feats:
                logits.append(feats["logits_unbiased"].astype(np.float32))
        arrays = {"pool3": np.concatenate(pool)}
        if logits:
            arrays["logits"] = np.concatenate(logits)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:        # a file object: np.savez adds no suffix
            np.savez(f, **arrays)
        if progress is not None and rank == 0:
            progress(present(), n)
        if on_chunk is not None:
            on_chunk(start, stop)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    parts = [_read_chunk(chunk_path(cache_dir, a, b), b - a) for a, b in chunks]
    out = {"pool3": np.concatenate([p["pool3"] for p in parts]).astype(np.float64)}
    if all("logits" in p for p in parts):
        out["logits"] = np.concatenate([p["logits"] for p in parts]).astype(np.float64)
    if progress is not None:
        progress(n, n)
    return out
