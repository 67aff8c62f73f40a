"""FID (and KID, Inception Score) of a model's images under EDM's protocol, with the protocol stamped on.

EDM's protocol (`generate.py` + `fid.py`): n images, image i from seed i (`apctl.generation`),
quantised to uint8 like EDM's PNGs, Inception-v3 pool3 features of all of them, then

    FID = ‖μ − μ_ref‖² + tr Σ + tr Σ_ref − 2 tr (Σ^{1/2} Σ_ref Σ^{1/2})^{1/2}

against a reference `.npz` (`mu`, `sigma`). Features come from `apctl.metrics.feature_cache`
(chunked, on disk, resumable, shared out over torchrun ranks), in a folder named by the hash of
everything that decides them: the sampler and its σ list, γ and NFE, the identity of the weights
(sha256 of the state dict, or the teacher's fingerprint), the detector's sha256 and the chunk size.
The reference is not part of that hash, so the same features can be scored against another file.

Every result carries `protocol`: sample count, seed rule and range, NFE, σ list, γ, which weights,
the reference file and its sha256, the detector weights and their sha256, the apctl version — what
it takes to reproduce the number.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from apctl.errors import ApctlError
from apctl.files import file_digest

SEED_RULE = ("image i from seed i: torch.Generator().manual_seed(i) on the CPU draws its noise, then its "
             "class, then any re-noising")


def weights_digest(net) -> str:
    """sha256 over a network's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_record(path: str | os.PathLike) -> dict[str, Any]:
    """The reference statistics (checked: mu (2048,), sigma (2048, 2048)) with their file's sha256 and extras."""
    from apctl.metrics.fid import load_reference_stats
    from apctl.metrics.reference_stats import load_reference_extras

    path = Path(path).expanduser()
    stats = load_reference_stats(path)
    return {**stats, **load_reference_extras(path), "path": str(path.resolve()), "sha256": file_digest(path)}


def detector_record(detector) -> dict[str, Any]:
    return {"detector": f"Inception-v3 (TF 2015-12-05 graph via torch-fidelity), weights from {detector.source}",
            "detector_weights": detector.path, "detector_sha256": file_digest(Path(detector.path))}


def model_features(make_images, identity: dict, n: int, detector, cache_root: str | os.PathLike,
                   batch_size: int = 64, chunk_size: int | None = None, rank: int = 0, world: int = 1,
                   progress: Callable[[int, int], None] | None = None, on_chunk=None, barrier=None
                   ) -> tuple[dict | None, dict]:
    """(features on rank 0 / None elsewhere, protocol) of `make_images` (`apctl.generation.StudentImages` or
    `TeacherEDMImages`) over seeds 0 … n−1, cached in `cache_root/<protocol hash>/`.

    identity: what names the weights ({'weights_sha256': …} or {'teacher_fingerprint': …}; these keys
    enter the hash) plus any context the protocol should carry (checkpoint, step)."""
    from apctl import __version__
    from apctl.metrics.feature_cache import DEFAULT_CHUNK, cached_features, protocol_hash

    if n < 2:
        raise ApctlError(f"FID needs at least 2 images, got {n}")
    chunk_size = chunk_size or DEFAULT_CHUNK
    det = detector_record(detector)
    hashed = {**make_images.protocol(), **{k: v for k, v in identity.items() if k.endswith(("sha256", "fingerprint"))},
              "detector_sha256": det["detector_sha256"], "chunk_size": chunk_size, "seed_rule": SEED_RULE}
    cache_dir = Path(cache_root) / protocol_hash(hashed)
    feats = cached_features(make_images, detector, n, cache_dir, chunk_size, batch_size, rank, world,
                            description=hashed, progress=progress, on_chunk=on_chunk, barrier=barrier)
    protocol = {"images": n, "seeds": f"0-{n - 1}", "seed_rule": SEED_RULE, **make_images.protocol(), **identity,
                **det, "apctl_version": __version__, "feature_cache": str(cache_dir), "processes": world}
    return feats, protocol


def score(make_images, identity: dict, n: int, reference: dict, detector, cache_root: str | os.PathLike,
          **kwargs) -> dict | None:
    """FID (KID when the reference has features, IS when the detector has logits) of `make_images` over seeds
    0 … n−1 against `reference` (`reference_record`), with its protocol; None on ranks other than 0.
    `kwargs` go to `model_features` (batch_size, chunk_size, rank, world, progress, on_chunk, barrier)."""
    from apctl.metrics.fid import frechet_distance_from_features

    feats, protocol = model_features(make_images, identity, n, detector, cache_root, **kwargs)
    if feats is None:
        return None
    pool3 = feats["pool3"]
    protocol.update(reference=reference["path"], reference_sha256=reference["sha256"],
                    reference_images=reference.get("num_images"))
    notes = []
    result: dict[str, Any] = {"fid": frechet_distance_from_features(pool3, reference["mu"], reference["sigma"])}
    if n < pool3.shape[1]:
        notes.append(f"{n} images < {pool3.shape[1]} feature dimensions: FID is biased upwards; "
                     f"compare only FIDs of the same image count")
    if "features" in reference:
        from apctl.metrics.kid import kernel_inception_distance

        result.update(kernel_inception_distance(pool3, reference["features"]))
    else:
        notes.append("no KID: the reference file has statistics only (mu, sigma); `apctl eval ref` adds features")
    if "logits" in feats:
        from apctl.metrics.inception_score import inception_score_from_logits

        splits = 10 if n >= 10 else 1
        result.update(inception_score_from_logits(feats["logits"], splits), inception_score_splits=splits)
    else:
        from apctl.metrics.inception import NO_LOGITS_NOTE

        notes.append(NO_LOGITS_NOTE)
    return {**result, "notes": notes, "protocol": protocol}


def features_as_reference(features: np.ndarray, label: str) -> dict:
    """A reference made from features in memory (e.g. the teacher's row): μ, Σ, the features for KID, a label."""
    from apctl.metrics.fid import feature_statistics

    return {**feature_statistics(features), "features": features, "num_images": len(features),
            "path": label, "sha256": None}
