"""Teachers: anything with D(x, σ, labels), a data `shape`, a `label_dim` and a `fingerprint()`."""

from __future__ import annotations

import os
from pathlib import Path
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


TEACHER_DIR_ENV = "APCTL_TEACHERS"


def teacher_search_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get(TEACHER_DIR_ENV, "").split(os.pathsep) if d]
    return dirs + [Path.home() / ".cache" / "apctl" / "teachers"]


def find_teacher_file(name: str) -> Path:
    """`name` as given, else by file name in $APCTL_TEACHERS and ~/.cache/apctl/teachers."""
    if not name:
        raise ApctlError("teacher.kind = 'network' needs a teacher file: pass --teacher FILE")
    given = Path(name).expanduser()
    if given.is_file():
        return given
    for d in teacher_search_dirs():
        if (d / given.name).is_file():
            return d / given.name
    looked = ", ".join(str(p) for p in [given.absolute()] + [d / given.name for d in teacher_search_dirs()])
    raise ApctlError(f"teacher file {given.name} not found (looked in {looked}); download it once (see "
                     f"docs/user_guide.md, 'Bringing real teachers and data') and pass --teacher PATH "
                     f"or put it in ${TEACHER_DIR_ENV}")


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

        path = find_teacher_file(t.file)
        bundle = load_teacher(path)
        return NetworkTeacher(bundle.network, bundle.fingerprint, source=str(path))
    raise ApctlError(f"unknown teacher kind {t.kind!r}")
