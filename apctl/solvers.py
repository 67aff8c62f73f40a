"""Deterministic solvers for the teacher's probability-flow ODE dx/dσ = (x − D(x, σ))/σ."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _per_sample(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def heun_step(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """One Heun step of the PF-ODE from σ = t to σ = u (per-sample tensors of shape (B,)).

    Euler predictor x' = x + (u − t)·d(x, t) with d = (x − D)/σ, then the trapezoidal corrector
    x_u = x + (u − t)·(d(x, t) + d(x', u))/2. Where u = 0 the corrector is skipped (EDM does the same),
    since d(·, 0) is undefined.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    tb, ub = t.view(shape), u.view(shape)
    d_t = (x - denoise(x, t, labels)) / tb
    x_euler = x + (ub - tb) * d_t
    if bool((u <= 0).all()):
        return x_euler
    safe_u = torch.where(u > 0, u, torch.ones_like(u))
    d_u = (x_euler - denoise(x_euler, safe_u, labels)) / safe_u.view(shape)
    x_heun = x + (ub - tb) * 0.5 * (d_t + d_u)
    return torch.where(ub > 0, x_heun, x_euler)


def heun_solve(denoise: Denoiser, x: torch.Tensor, sigmas: Sequence[float],
               labels: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate the PF-ODE through the decreasing noise levels `sigmas` with Heun steps.

    `progress(done, total)` is called after each step."""
    for i in range(len(sigmas) - 1):
        x = heun_step(denoise, x, _per_sample(sigmas[i], x), _per_sample(sigmas[i + 1], x), labels)
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x
