"""The optimizer of the `[training]` section: RAdam (CTM's, sony/ctm `code/cm/train_util.py`) or Adam,
with the moment decays β = (β₁, β₂) of `training.betas`:

    m ← β₁·m + (1 − β₁)·∇,   v ← β₂·v + (1 − β₂)·∇²,   θ ← θ − lr·m̂ / (√v̂ + ε)      (m̂, v̂ bias-corrected)

RAdam also damps the step by its rectifier r(k) until the variance estimate is trusted, which with
β₂ = 0.999 takes thousands of steps (docs/benchmarks.md). torch's default β = (0.9, 0.999) is CTM's;
EDM2 trains with Adam and β₂ = 0.99 (NVlabs/edm2 `training/training_loop.py`), as the toy2d preset does.
The learning rate of each step is set by `training/schedule.py`.
"""

from __future__ import annotations

from typing import Iterable

import torch

from apctl.config import TrainingConfig

OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}


def build_optimizer(tc: TrainingConfig, parameters: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """`training.optimizer` over `parameters`, with `training.betas` and the step's learning rate `lr`."""
    return OPTIMIZERS[tc.optimizer](parameters, lr=lr, betas=tuple(tc.betas))
