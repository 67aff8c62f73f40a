"""Consistency distillation objectives on the discrete Karras grid t_0 = σ_max > … > t_{N−1} = σ_min.

CTM (Kim et al. 2024; math note §1.4), per sample:
    i ~ U{0 … N−2},  k ~ U{1 … min(K, N−1−i)},  j ~ U{i+k … N−1};   t = t_i, u = t_{i+k}, s = t_j
    x_t      = x_0 + t·ε
    x̂_u      = k teacher Heun steps t → u from x_t                                   (no grad)
    estimate = G_{θ⁻}(G_θ(x_t, t, s), s, σ_min)                                       (grad through x only in the outer jump)
    target   = G_{θ⁻}(G_{θ⁻}(x̂_u, u, s), s, σ_min)                                    (no grad)
    loss     = d(estimate, target) + λ_DSM · w(σ)·‖D_θ(x_0 + σε, σ, σ) − x_0‖²,   ln σ ~ N(−1.2, 1.2²),
               w(σ) = (σ² + σ_d²)/(σ·σ_d)²   (EDM's weight; keeps D_θ(·, t, t) the denoiser)

CD (Song et al. 2023), the single-step slice with a one-step teacher:
    i ~ U{0 … N−2},  t = t_i, u = t_{i+1}
    loss = d(G_θ(x_t, t, σ_min), G_{θ⁻}(x̂_u, u, σ_min))

G is the student jump f(t,s)·x + g(t,s)·D(x, t, s) of the run's preconditioning; θ⁻ is the
stop-gradient EMA target network. Each objective returns (mean loss, logs).
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from apctl.config import ObjectiveConfig
from apctl.errors import ApctlError
from apctl.objectives.distances import build_distance
from apctl.preconditioning.jump import jump
from apctl.schedules import SIGMA_DATA, karras_sigmas
from apctl.sampling import heun_step

P_MEAN, P_STD = -1.2, 1.2


class _GridObjective:
    def __init__(self, teacher, precond, grid: np.ndarray, distance: nn.Module):
        self.teacher = teacher
        self.precond = precond
        self.grid = torch.as_tensor(grid, dtype=torch.float64)
        self.distance = distance
        self.sigma_min = float(grid[-1])

    def _teacher(self, x, sigma, labels):
        return self.teacher(x.to(self.teacher.dtype), sigma.to(self.teacher.dtype), labels).to(x.dtype)

    @torch.no_grad()
    def teacher_steps(self, x: torch.Tensor, start: torch.Tensor, steps: torch.Tensor, labels) -> torch.Tensor:
        """Per sample, `steps[b]` Heun steps along the grid from index `start[b]`; rows stop when done."""
        x = x.clone()
        for m in range(int(steps.max())):
            rows = (steps > m).nonzero().squeeze(1)
            idx = start[rows] + m
            t = self.grid[idx].to(x)
            u = self.grid[idx + 1].to(x)
            y = None if labels is None else labels[rows]
            x[rows] = heun_step(self._teacher, x[rows], t, u, y)
        return x

    def to_sigma_min(self, net, x, s, labels):
        """G(x, s, σ_min); rows already at σ_min are returned as they are (G(x, s, s) = x)."""
        rows = (s > self.sigma_min).nonzero().squeeze(1)
        if len(rows) == len(s):
            return jump(self.precond, net, x, s, torch.full_like(s, self.sigma_min), labels)
        out = x.clone()
        if len(rows):
            y = None if labels is None else labels[rows]
            out[rows] = jump(self.precond, net, x[rows], s[rows], torch.full_like(s[rows], self.sigma_min), y)
        return out


class CTMObjective(_GridObjective):
    name = "ctm"

    def __init__(self, teacher, precond, grid, distance, max_teacher_steps: int, dsm_weight: float,
                 sigma_data: float = SIGMA_DATA):
        super().__init__(teacher, precond, grid, distance)
        self.max_teacher_steps = max_teacher_steps
        self.dsm_weight = dsm_weight
        self.sigma_data = sigma_data

    def sample_indices(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(i, k, j) per sample, drawn as in the module docstring."""
        N = len(self.grid)
        i = torch.randint(0, N - 1, (batch,), generator=gen)
        k_max = torch.clamp(N - 1 - i, max=self.max_teacher_steps)
        k = 1 + (torch.rand(batch, generator=gen) * k_max).long().clamp(max=k_max - 1)
        j = i + k + (torch.rand(batch, generator=gen) * (N - i - k)).long().clamp(max=N - 1 - i - k)
        return i, k, j

    def __call__(self, student: nn.Module, target: nn.Module, x0: torch.Tensor, labels, gen: torch.Generator):
        B = x0.shape[0]
        i, k, j = self.sample_indices(B, gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0)
        t, u, s = (self.grid[idx].to(x0) for idx in (i, i + k, j))
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = x0 + t.view(shape) * eps
        x_u = self.teacher_steps(x_t, i, k, labels)

        estimate = self.to_sigma_min(target, jump(self.precond, student, x_t, t, s, labels), s, labels)
        with torch.no_grad():
            goal = self.to_sigma_min(target, jump(self.precond, target, x_u, u, s, labels), s, labels)
        consistency = self.distance(estimate, goal)

        # DSM on D_θ(·, σ, σ), EDM-weighted.
        sigma = (torch.randn(B, generator=gen) * P_STD + P_MEAN).exp().to(x0)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        denoised = student(x0 + sigma.view(shape) * noise, sigma, sigma, labels)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        dsm = weight * (denoised - x0).float().pow(2).flatten(1).mean(1)

        loss = consistency.mean() + self.dsm_weight * dsm.mean()
        return loss, {"loss": loss.item(), "ctm": consistency.mean().item(), "dsm": dsm.mean().item()}


class CDObjective(_GridObjective):
    name = "cd"

    def __call__(self, student: nn.Module, target: nn.Module, x0: torch.Tensor, labels, gen: torch.Generator):
        B = x0.shape[0]
        N = len(self.grid)
        i = torch.randint(0, N - 1, (B,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0)
        t, u = self.grid[i].to(x0), self.grid[i + 1].to(x0)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = x0 + t.view(shape) * eps
        x_u = self.teacher_steps(x_t, i, torch.ones_like(i), labels)
        estimate = self.to_sigma_min(student, x_t, t, labels)
        with torch.no_grad():
            goal = self.to_sigma_min(target, x_u, u, labels)
        loss = self.distance(estimate, goal).mean()
        return loss, {"loss": loss.item()}


def build_objective(cfg: ObjectiveConfig, teacher, precond):
    """The objective of the `[objective]` section: shared keys here, the kind's own keys from its section."""
    grid = karras_sigmas(cfg.grid_points)
    distance = build_distance(cfg.distance)
    if cfg.kind == "ctm":
        return CTMObjective(teacher, precond, grid, distance, cfg.ctm.max_teacher_steps, cfg.ctm.dsm_weight)
    if cfg.kind == "cd":
        return CDObjective(teacher, precond, grid, distance)
    raise ApctlError(f"unknown objective {cfg.kind!r}")
