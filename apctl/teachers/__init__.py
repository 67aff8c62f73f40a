"""Teachers: the frozen denoiser D(x, σ, labels) a student learns from, exact mixtures or EDM networks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from apctl.config import TeacherConfig
from apctl.errors import ApctlError, MissingFileError
from apctl.files import search_dirs
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher


class Teacher(Protocol):
    """The contract every teacher keeps; nothing outside `teachers/` asks a teacher what it is.

    shape      per-sample data shape, e.g. (2,) or (C, H, W)
    label_dim  number of classes (0: unconditional); labels are one-hot (B, label_dim)
    dtype      the dtype it computes in (float64 for exact mixtures, float32 for networks)
    device     where its tensors live; `to(device)` moves them and returns the teacher
    network    the EDM network (nn.Module) a student can start from, or None for exact teachers
    exact      True when `sample` draws exact samples of its data distribution; exact teachers are
               Gaussian mixtures, and `components()` gives (means, variances), (K, d) each, on the CPU
    source     where it came from, for people (the file it was loaded from, or the mixture's name);
               `fingerprint()` is what identifies it
    """

    shape: tuple[int, ...]
    label_dim: int
    dtype: torch.dtype
    network: torch.nn.Module | None
    exact: bool
    source: str

    @property
    def device(self) -> torch.device: ...

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...

    def to(self, device: torch.device | str) -> "Teacher": ...

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact samples x_0, shape (n, *shape), for `exact` teachers (integer `labels` pick classes)."""


TEACHER_DIR_ENV = "APCTL_TEACHERS"


def teacher_search_dirs() -> list[Path]:
    """Where a teacher file named without a path is looked for: $APCTL_TEACHERS, ~/.cache/apctl/teachers,
    then the teachers shipped with apctl (the repository's teachers/ for a clone, <prefix>/share/apctl/teachers
    for a wheel)."""
    shipped = [Path(__file__).resolve().parent.parent.parent / "teachers", Path(sys.prefix) / "share" / "apctl" / "teachers"]
    return search_dirs(TEACHER_DIR_ENV, "teachers") + shipped


def find_teacher_file(name: str) -> Path:
    """`name` as given, else by file name in `teacher_search_dirs()`."""
    if not name:
        raise MissingFileError("teacher.kind = 'network' needs a teacher file: pass --teacher FILE")
    given = Path(name).expanduser()
    if given.is_file():
        return given
    for d in teacher_search_dirs():
        if (d / given.name).is_file():
            return d / given.name
    looked = ", ".join(str(p) for p in [given.absolute()] + [d / given.name for d in teacher_search_dirs()])
    raise MissingFileError(f"teacher file {given.name} not found (looked in {looked}); download it once (see "
                           f"docs/user_guide.md, 'Bringing real teachers and data') and pass --teacher PATH "
                           f"or put it in ${TEACHER_DIR_ENV}")


def build_teacher(t: TeacherConfig, data=None) -> Teacher | None:
    """The teacher of the `[teacher]` section (None for kind = "none"); `data` (an ImageData,
    labelled when the run is class-conditional) is needed for empirical teachers."""
    if t.kind == "none":
        return None
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
        return GaussianMixtureTeacher(means, np.full(len(data), t.bandwidth), None, data.labels,
                                      shape=data.image_shape, name=f"empirical-{data.name}")
    if t.kind == "network":
        from apctl.teachers.importers import load_teacher
        from apctl.teachers.network import NetworkTeacher

        path = find_teacher_file(t.file)
        bundle = load_teacher(path)
        return NetworkTeacher(bundle.network, bundle.fingerprint, source=str(path))
    raise ApctlError(f"unknown teacher kind {t.kind!r}")
