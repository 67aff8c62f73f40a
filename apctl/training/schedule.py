"""The learning rate as a function of the step alone, so a resumed run sets the same rate as an
uninterrupted one (the optimizer's param_groups travel in every checkpoint as well).

For the optimizer step k = 0, 1, …, T − 1 (T = training.iterations, W = training.lr_warmup,
h = training.lr_hold, f = training.lr_floor, lr = training.lr):

    warm(k)  = min(1, (k + 1)/W)                     (1 when W = 0; EDM's linear ramp-up)
    D        = W + h·(T − W)                          (the decay's start: a fraction h of the run after
                                                       the warm-up is held at full lr first)
    p(k)     = clamp((k − D)/(T − D), 0, 1)           (0 during the warm-up and the hold)
    decay(k) = 1                                      constant (the paper's runs)
             = f + (1 − f)·(1 − p)                    linear
             = f + (1 − f)·½·(1 + cos(π·p))           cosine
    lr(k)    = lr · warm(k) · decay(k)

The decay reaches f·lr at k = T (the step after the last), so T is part of the schedule: a run with a
decaying schedule cannot change training.iterations on resume (`run.config_differences`).
"""

from __future__ import annotations

import math

import torch

from apctl.config import TrainingConfig


def learning_rate(tc: TrainingConfig, step: int) -> float:
    """lr(step) by the closed form of the module docstring."""
    warm = min(1.0, (step + 1) / tc.lr_warmup) if tc.lr_warmup else 1.0
    start = decay_start(tc)
    progress = min(1.0, max(0.0, (step - start) / max(tc.iterations - start, 1)))
    if tc.lr_schedule == "linear":
        decay = tc.lr_floor + (1 - tc.lr_floor) * (1 - progress)
    elif tc.lr_schedule == "cosine":
        decay = tc.lr_floor + (1 - tc.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1.0
    return tc.lr * warm * decay


def decay_start(tc: TrainingConfig) -> float:
    """D = W + h·(T − W): the step at which the decay begins (the end of the warm-up when h = 0)."""
    return tc.lr_warmup + tc.lr_hold * (tc.iterations - tc.lr_warmup)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
