"""Exponential moving averages of network weights: θ_ema ← μ·θ_ema + (1 − μ)·θ."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy with gradients off, for the target network θ⁻ and the evaluation EMA."""
    return copy.deepcopy(net).requires_grad_(False)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float, took: torch.Tensor | None = None) -> None:
    """θ_ema ← θ_ema + (1 − μ)·took·(θ − θ_ema); `took` (a 0-d bool tensor on the device) = 0 leaves
    θ_ema unchanged without a host round trip. Buffers are copied where the step was taken."""
    weight = 1.0 - decay if took is None else (1.0 - decay) * took.float()
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), weight if took is None else weight.to(p_ema.dtype))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        if took is None or not b.is_floating_point():
            b_ema.copy_(b)
        else:
            b_ema.copy_(torch.where(took, b, b_ema))
