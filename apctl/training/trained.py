"""A trained student from a checkpoint: its network, preconditioning, grid and teacher, for sampling and eval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apctl.checkpoints import Checkpoint, load_checked_checkpoint
from apctl.config import Config, config_from_dict
from apctl.errors import ApctlError
from apctl.preconditioning.build import preconditioning_from_state
from apctl.schedules import karras_sigmas


@dataclass
class TrainedStudent:
    cfg: Config
    checkpoint: Checkpoint
    net: torch.nn.Module
    precond: object
    grid: np.ndarray
    shape: tuple[int, ...]
    label_dim: int

    def teacher(self):
        """The run's teacher, rebuilt from its config (needs the teacher and data files for network teachers)."""
        from apctl.data.sources import load_training_data
        from apctl.teachers import build_teacher

        data = load_training_data(self.cfg.data) if self.cfg.teacher.kind == "empirical" else None
        teacher = build_teacher(self.cfg.teacher, data)
        if teacher.fingerprint() != self.checkpoint.meta.get("teacher_fingerprint"):
            raise ApctlError(f"the teacher this config describes ({teacher.fingerprint()}) is not the one "
                             f"{self.checkpoint.path} was distilled from ({self.checkpoint.meta.get('teacher_fingerprint')})")
        return teacher


def load_trained_student(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu") -> TrainedStudent:
    """`weights` ∈ {'ema' (evaluation EMA, default), 'student' (raw), 'target' (θ⁻)}; the network is put
    on `device` (the preconditioning computes its coefficients on the CPU wherever the network is)."""
    from apctl.networks.student import build_student, student_data_shape

    ckpt = load_checked_checkpoint(path)
    cfg = config_from_dict(ckpt.meta["config"], source=str(ckpt.path))
    arch = ckpt.meta["student"]          # load_checkpoint has decoded its "inf" strings (apctl.strict_json)
    net = build_student(arch)
    state = ckpt.group(weights)
    if not state:
        raise ApctlError(f"{ckpt.path} has no '{weights}' weights")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ApctlError(f"{ckpt.path}: weights do not fit the saved architecture ({str(exc).splitlines()[0]})") from None
    net.eval().requires_grad_(False).to(device)
    precond = preconditioning_from_state(cfg.precond, ckpt.group("precond"))
    shape, label_dim = student_data_shape(arch)
    return TrainedStudent(cfg, ckpt, net, precond, karras_sigmas(cfg.objective.grid_points), shape, label_dim)
