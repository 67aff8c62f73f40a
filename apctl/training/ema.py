"""Exponential moving averages of network weights: θ_ema ← μ·θ_ema + (1 − μ)·θ."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy with gradients off, for the target network θ⁻ and the evaluation EMA."""
    return copy.deepcopy(net).requires_grad_(False)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
