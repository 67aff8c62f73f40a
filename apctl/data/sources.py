"""Where training batches x_0 come from, as the `[data]` section says: exact samples of an analytic
teacher (data.kind = "teacher") or a data set held in memory."""

from __future__ import annotations

import torch

from apctl.config import DataConfig
from apctl.draws import as_draws
from apctl.data.images import ImageData


class TeacherSamples:
    """Exact draws x_0 ~ p_data of an exact teacher (its own data distribution), with classes drawn
    by the mixture weights when the run is class-conditional."""

    def __init__(self, teacher, conditional: bool):
        self.teacher = teacher
        self.shape = teacher.shape
        self.label_dim = teacher.label_dim if conditional else 0

    def sample(self, batch_size: int, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`generator`: a CPU torch.Generator or a step's per-sample draws (apctl/draws.py)."""
        draws = as_draws(generator, batch_size)
        if not self.label_dim:
            return self.teacher.sample(batch_size, draws).float(), None
        # Draws on the CPU generator from host copies (the teacher may live on a GPU).
        k = draws.categorical(self.teacher.log_weights.cpu().exp())
        classes = self.teacher.classes.cpu()[k]
        x0 = self.teacher.sample(batch_size, draws, labels=classes).float()
        return x0, torch.nn.functional.one_hot(classes, self.label_dim).float()


class DatasetSamples:
    """Uniform draws (with replacement, optional x-flips) from an in-memory image data set; labels
    exactly when the data set was loaded with them."""

    def __init__(self, data: ImageData, xflip: bool):
        self.data = data
        self.xflip = xflip
        self.shape = data.image_shape
        self.label_dim = data.label_dim

    def sample(self, batch_size: int, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`generator`: a CPU torch.Generator or a step's per-sample draws (apctl/draws.py)."""
        return self.data.sample_batch(generator, batch_size, xflip=self.xflip)


def load_training_data(cfg: DataConfig) -> ImageData | None:
    """The data set of the `[data]` section (None for kind = 'teacher'), labelled iff class-conditional."""
    from apctl.data import load_image_data

    if cfg.kind == "teacher":
        return None
    options = {"use_labels": cfg.class_conditional}
    if cfg.kind == "digits":
        return load_image_data("digits", None, resolution=cfg.resolution, **options)
    return load_image_data(cfg.kind, cfg.path or None, **options)


def build_data_source(cfg: DataConfig, teacher, data: ImageData | None):
    if cfg.kind == "teacher":
        return TeacherSamples(teacher, cfg.class_conditional)
    return DatasetSamples(data, cfg.xflip)
