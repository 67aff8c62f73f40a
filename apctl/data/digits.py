"""scikit-learn's bundled 8×8 handwritten digits: a tiny labelled image set for CPU runs.

`sklearn.datasets.load_digits()` ships inside scikit-learn (no download): 1797 images, 8×8, one
channel, integer intensities 0–16, labels 0–9. They become uint8 by round(v · 255 / 16), so 0 → 0
and 16 → 255.

`resolution` 16 or 32 upsamples the 8×8 images. The default is **bilinear** interpolation
(torch `interpolate(mode="bilinear", align_corners=False)`, then rounded back to uint8): smoother
images, closer to natural-image statistics than blocky pixels. `upsample="nearest"` repeats each
pixel instead (exactly 2× / 4× blocks).
"""

from __future__ import annotations

import numpy as np
import torch

from apctl.data.images import ImageData
from apctl.errors import ApctlError

RESOLUTIONS = (8, 16, 32)
UPSAMPLE_MODES = ("bilinear", "nearest")
NUM_CLASSES = 10


def _upsample(images: np.ndarray, resolution: int, mode: str) -> np.ndarray:
    x = torch.from_numpy(images).to(torch.float32)
    if mode == "bilinear":
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    else:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="nearest")
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()


def load_digits(*, resolution: int = 8, upsample: str = "bilinear", use_labels: bool = True) -> ImageData:
    """The 1797 sklearn digits as uint8 (1797, 1, resolution, resolution), labels 0..9.

    resolution: 8 (native), 16 or 32 (upsampled with `upsample`: "bilinear" (default) or "nearest").
    use_labels: False drops the labels (label_dim 0).
    """
    try:
        resolution = int(resolution)
    except (TypeError, ValueError):
        resolution = -1
    if resolution not in RESOLUTIONS:
        raise ApctlError(f"digits resolution must be one of {', '.join(map(str, RESOLUTIONS))}, "
                         f"not {resolution if resolution != -1 else 'a non-integer'}; set resolution to 8, 16 or 32")
    if upsample not in UPSAMPLE_MODES:
        raise ApctlError(f"digits upsample mode {upsample!r} is unknown; use one of {', '.join(UPSAMPLE_MODES)}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise ApctlError(f"the digits dataset needs scikit-learn, which cannot be imported ({exc}); "
                         f"install it with `pip install scikit-learn`") from None
    bunch = sklearn_load_digits()
    data = np.asarray(bunch.data, dtype=np.float64)
    target = np.asarray(bunch.target)
    if data.ndim != 2 or data.shape[1] != 64 or target.shape != (data.shape[0],):
        raise ApctlError(f"scikit-learn's digits data has an unexpected shape {data.shape}; "
                         f"reinstall scikit-learn (`pip install --force-reinstall scikit-learn`)")
    images = np.rint(np.clip(data, 0, 16) * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    if resolution != 8:
        images = _upsample(images, resolution, upsample)
    labels = target.astype(np.int64)
    name = "digits" if resolution == 8 else f"digits{resolution}"
    source = "sklearn.datasets.load_digits"
    if resolution != 8:
        source += f" ({upsample} upsampled to {resolution}x{resolution})"
    return ImageData(
        images=np.ascontiguousarray(images),
        labels=labels if use_labels else None,
        label_dim=NUM_CLASSES if use_labels else 0,
        name=name,
        source=source,
    )
