"""The student's jump G_θ(x, t, s) = f(t, s)·x + g(t, s)·D_θ(x, t, s), shared by training and sampling."""

from __future__ import annotations

import torch
from torch import nn

from apctl.preconditioning.coefficients import Preconditioning


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def jump(precond: Preconditioning, net: nn.Module, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
         labels: torch.Tensor | None = None) -> torch.Tensor:
    """G(x, t, s) for per-sample t ≥ s of shape (B,); f and g come from `precond` in float64 on the CPU,
    then are cast and moved to x's device. t and s may live on the CPU (then no device value is read
    on the host) or on x's device; the network sees them, and the labels, on x's device."""
    f, g = precond.coefficients(t.detach().cpu(), s.detach().cpu())
    labels = None if labels is None else labels.to(x.device)
    D = net(x, t.to(x.device), s.to(x.device), labels)
    return _per_sample(f, x) * x + _per_sample(g, x) * D
