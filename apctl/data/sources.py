"""Where training batches x_0 come from: exact samples of an analytic teacher, or a data set."""

from __future__ import annotations

import torch

from apctl.config import Config
from apctl.data.images import ImageData
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher


class TeacherSamples:
    """Exact draws x_0 ~ p_data of a Gaussian-mixture teacher (its own data distribution)."""

    def __init__(self, teacher: GaussianMixtureTeacher, conditional: bool):
        self.teacher = teacher
        self.conditional = conditional and teacher.label_dim > 0
        self.label_dim = teacher.label_dim if self.conditional else 0

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.conditional:
            return self.teacher.sample(batch_size, generator).float(), None
        k = torch.multinomial(self.teacher.log_weights.exp(), batch_size, replacement=True, generator=generator)
        classes = self.teacher.classes[k]
        x0 = self.teacher.sample(batch_size, generator, labels=classes).float()
        return x0, torch.nn.functional.one_hot(classes, self.label_dim).float()


class DatasetSamples:
    """Uniform draws (with replacement, optional x-flips) from an in-memory image data set."""

    def __init__(self, data: ImageData, xflip: bool, conditional: bool):
        self.data = data
        self.xflip = xflip
        self.conditional = conditional and data.label_dim > 0
        self.label_dim = data.label_dim if self.conditional else 0

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        x0, labels = self.data.sample_batch(generator, batch_size, xflip=self.xflip)
        return x0, labels if self.conditional else None


def load_training_data(cfg: Config) -> ImageData | None:
    """The data set a config names (None for data.kind = 'teacher')."""
    from apctl.data import load_image_data

    kind = cfg.data.kind
    if kind == "teacher":
        return None
    if kind == "digits":
        return load_image_data("digits", None, resolution=cfg.data.resolution)
    return load_image_data(kind, cfg.data.path or None)


def build_data_source(cfg: Config, teacher, data: ImageData | None):
    if isinstance(teacher, GaussianMixtureTeacher):
        return TeacherSamples(teacher, cfg.data.class_conditional)
    return DatasetSamples(data, cfg.data.xflip, cfg.data.class_conditional)
