"""Teachers: anything with D(x, σ, labels), a data `shape`, a `label_dim` and a `fingerprint()`."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from apctl.config import Config
from apctl.errors import ApctlError
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher


class Teacher(Protocol):
    shape: tuple[int, ...]
    label_dim: int

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


def build_teacher(cfg: Config, data=None) -> Teacher:
    """The teacher a config describes; `data` (an ImageData) is needed for empirical teachers."""
    t = cfg.teacher
    if t.kind == "gmm":
        stds = t.stds if isinstance(t.stds, list) else [float(t.stds)] * len(t.means)
        try:
            return GaussianMixtureTeacher(t.means, stds, t.weights or None, t.classes or None, name="gmm")
        except (ValueError, TypeError) as exc:
            raise ApctlError(f"teacher: invalid Gaussian mixture ({exc})") from None
    if t.kind == "empirical":
        if data is None:
            raise ApctlError("an empirical teacher needs its data set")
        means = data.to_tensor().double().reshape(len(data), -1).numpy()
        classes = data.labels if (cfg.data.class_conditional and data.labels is not None) else None
        return GaussianMixtureTeacher(means, np.full(len(data), t.bandwidth), None, classes,
                                      shape=data.image_shape, name=f"empirical-{data.name}")
    if t.kind == "network":
        from apctl.teachers.importers import load_teacher
        from apctl.teachers.network import NetworkTeacher

        if not t.file:
            raise ApctlError("teacher.kind = 'network' needs teacher.file (or --teacher FILE)")
        bundle = load_teacher(t.file)
        return NetworkTeacher(bundle.network, bundle.fingerprint, source=t.file)
    raise ApctlError(f"unknown teacher kind {t.kind!r}")
