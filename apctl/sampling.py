"""Sampling: the teacher's probability-flow ODE solver, and few-step sampling from a two-time student.

The teacher's PF-ODE (EDM, Karras et al. 2022, eq. 4 with σ(t) = t):  dx/dσ = (x − D(x, σ))/σ,
integrated by Heun's method (EDM Algorithm 1).

CTM γ-sampling (Kim et al. 2024) over decreasing noise levels σ_0 = σ_max > σ_1 > … > σ_n = σ_min:

    x ← σ_max·z
    for each step n:  s = √(1 − γ²)·(σ_{n+1} − σ_min) + σ_min
                      x ← G(x, σ_n, s)
                      x ← x + √(σ_{n+1}² − s²)·ξ        (ξ fresh noise; nothing to add when γ = 0)

γ = 0 is deterministic multi-step jumping (each step lands exactly on σ_{n+1}); γ = 1 jumps to
σ_min and re-noises, the CM multistep sampler. The number of network evaluations is n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from apctl.errors import ApctlError
from apctl.preconditioning.jump import jump
from apctl.schedules import SIGMA_MAX, SIGMA_MIN, check_sigmas, karras_sigmas, snap_to_grid

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _per_sample(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def heun_step(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """One Heun step of the PF-ODE from σ = t to σ = u (per-sample tensors of shape (B,)).

    Euler predictor x' = x + (u − t)·d(x, t) with d = (x − D)/σ, then the trapezoidal corrector
    x_u = x + (u − t)·(d(x, t) + d(x', u))/2. Rows with u = 0 keep the Euler step (EDM does the
    same: d(·, 0) is undefined). No host synchronisation: both evaluations run for every row.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    tb, ub = t.view(shape), u.view(shape)
    d_t = (x - denoise(x, t, labels)) / tb
    x_euler = x + (ub - tb) * d_t
    safe_u = torch.where(u > 0, u, torch.ones_like(u))
    d_u = (x_euler - denoise(x_euler, safe_u, labels)) / safe_u.view(shape)
    x_heun = x + (ub - tb) * 0.5 * (d_t + d_u)
    return torch.where(ub > 0, x_heun, x_euler)


def euler_step(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """One Euler step x + (u − t)·(x − D(x, t))/t (EDM's last step, to σ = 0)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return x + (u - t).view(shape) * (x - denoise(x, t, labels)) / t.view(shape)


def heun_chain(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor, start: torch.Tensor, k_max: int,
               steps: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, `steps[b]` Heun steps along the decreasing levels `sigma` from index `start[b]` (device
    tensors; indices past the last level stay on it); `k_max` = max(steps) is a host integer. Rows that
    are done keep their value (a mask, no gather); `steps = None`: every row takes k_max steps, no mask."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    last = len(sigma) - 1
    for m in range(k_max):
        a, b = torch.clamp(start + m, max=last), torch.clamp(start + m + 1, max=last)
        stepped = heun_step(denoise, x, sigma[a].to(x.dtype), sigma[b].to(x.dtype), labels)
        x = stepped if steps is None else torch.where((steps > m).view(shape), stepped, x)
    return x


def heun_solve(denoise: Denoiser, x: torch.Tensor, sigmas: Sequence[float],
               labels: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate the PF-ODE through the decreasing noise levels `sigmas` with Heun steps; a step to
    σ = 0 is an Euler step (EDM's sampler), so 18 levels + 0 cost 35 evaluations.

    `progress(done, total)` is called after each step."""
    for i in range(len(sigmas) - 1):
        step = euler_step if sigmas[i + 1] == 0 else heun_step
        x = step(denoise, x, _per_sample(sigmas[i], x), _per_sample(sigmas[i + 1], x), labels)
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return x


def default_sigmas(nfe: int, grid: np.ndarray | None = None, schedule: str = "grid") -> list[float]:
    """The default σ list for `nfe` steps: a Karras (ρ = 7) schedule of nfe + 1 levels from σ_max to
    σ_min. schedule = "karras" takes it as is (CTM's `exact` sampler: NFE 2 = 80 → 2.515 → 0.002);
    "grid" snaps the inner levels to the student's training grid (a grid-trained student has only
    seen jumps between grid levels)."""
    if nfe < 1:
        raise ApctlError(f"NFE must be at least 1, got {nfe}")
    if schedule not in ("grid", "karras"):
        raise ApctlError(f"σ schedule must be 'grid' or 'karras', got {schedule!r}")
    sigmas = karras_sigmas(nfe + 1)
    if schedule == "grid" and grid is not None and nfe > 1:
        sigmas[1:-1] = snap_to_grid(sigmas[1:-1], grid)
        sigmas = np.array(sorted(set(sigmas.tolist()), reverse=True))
        if len(sigmas) != nfe + 1:
            raise ApctlError(f"NFE {nfe} needs more distinct levels than the {len(grid)}-point training grid has; "
                             "pass --sigmas explicitly")
    return [float(s) for s in sigmas]


@dataclass(frozen=True)
class SigmaPolicy:
    """How an NFE-n student sample picks its σ list: the run's own list for n (`levels[n]`, the `[eval.levels]`
    table) when it names one, else `default_sigmas(n, grid, schedule)`. With schedule = "grid" the inner
    levels of a named list snap to the training grid too, so a preset may write them rounded.

    A named list is the tuned intermediate time of consistency models' multistep sampling (Song et al.
    2023 search it by ternary search on FID: openai/consistency_models samples ImageNet-64 with
    `--ts 0,22,39` of a 40-level grid); the Karras levels are the default when nothing was tuned."""

    schedule: str = "grid"
    levels: Mapping[int, tuple[float, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, eval_cfg, schedule: str | None = None) -> "SigmaPolicy":
        """The policy of a run's `[eval]` section (the one reader of `eval.sigmas` and `eval.levels`); an
        explicit `schedule` (a command's --sigma-schedule) replaces both: every NFE gets that schedule."""
        if schedule is not None:
            return cls(schedule)
        return cls(eval_cfg.sigmas, {int(n): tuple(float(s) for s in v) for n, v in eval_cfg.levels.items()})

    def sigmas(self, nfe: int, grid: np.ndarray | None = None) -> list[float]:
        """The σ list of an NFE-`nfe` sample (class docstring)."""
        if nfe not in self.levels:
            return default_sigmas(nfe, grid, self.schedule)
        sigmas = check_sigmas(self.levels[nfe])
        if self.schedule == "grid" and grid is not None and nfe > 1:
            inner = snap_to_grid(np.asarray(sigmas[1:-1]), grid).tolist()
            sigmas = check_sigmas([sigmas[0], *inner, sigmas[-1]])
        return [float(s) for s in sigmas]

    def describe(self) -> str | dict:
        """Plain data naming the policy (in cache keys and reports): the schedule alone when no list is named."""
        if not self.levels:
            return self.schedule
        return {"schedule": self.schedule, "levels": {str(n): list(v) for n, v in sorted(self.levels.items())}}


def sigma_lists(nfes: Sequence[int], grid: np.ndarray | None = None, policy: SigmaPolicy = SigmaPolicy(),
                sigmas: Sequence[float] | None = None) -> list[list[float]]:
    """The σ list of each NFE in `nfes` (`policy.sigmas`), or, given `sigmas`, that one list (its NFE is
    len(sigmas) − 1)."""
    if sigmas is not None:
        return [check_sigmas(sigmas)]
    return [policy.sigmas(nfe, grid) for nfe in nfes]


def class_labels(n: int, label_dim: int, label: int | None = None) -> torch.Tensor | None:
    """One-hot labels (n, label_dim) on the CPU: every sample of class `label`, or classes cycling 0, 1, …;
    None for an unconditional student (label_dim = 0)."""
    if not label_dim:
        return None
    classes = torch.full((n,), label) if label is not None else torch.arange(n) % label_dim
    return torch.nn.functional.one_hot(classes, label_dim).float()


@torch.no_grad()
def student_sample(net, precond, z: torch.Tensor, sigmas: Sequence[float], labels: torch.Tensor | None = None,
                   gamma: float = 0.0, generator: torch.Generator | None = None,
                   noise: Callable[[torch.Size], torch.Tensor] | None = None) -> torch.Tensor:
    """CTM γ-sampling from unit noise z (B, *shape) along `sigmas` (see module docstring), on z's device
    (the student's). The times are host values: they stay on the CPU for the coefficients and reach
    the network on the device; re-noising is drawn from `generator` (CPU) and moved there, or taken from
    `noise(shape)` when given (per-image seeded draws, `apctl.generation.SeedGenerators.randn`)."""
    if not 0.0 <= gamma <= 1.0:
        raise ApctlError(f"gamma must lie in [0, 1], got {gamma}")
    sigmas = check_sigmas(sigmas)
    sigma_min = sigmas[-1]
    x = z * sigmas[0]
    B = z.shape[0]
    for now, nxt in zip(sigmas[:-1], sigmas[1:]):
        s = math.sqrt(1.0 - gamma ** 2) * (nxt - sigma_min) + sigma_min
        t_b = torch.full((B,), now, dtype=z.dtype)
        s_b = torch.full((B,), s, dtype=z.dtype)
        x = jump(precond, net, x, t_b, s_b, labels)
        renoise = math.sqrt(max(nxt ** 2 - s ** 2, 0.0))
        if renoise > 0:
            xi = noise(x.shape) if noise is not None else torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + renoise * xi.to(device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def teacher_sample(teacher, z: torch.Tensor, steps: int, labels: torch.Tensor | None = None,
                   sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, progress=None) -> torch.Tensor:
    """The teacher's deterministic Heun sampler over a Karras schedule of `steps` steps, σ_max → σ_min.
    EDM's final Euler step to σ = 0 is left out, so that the result is comparable with a student's
    landing at σ_min: every step is a Heun step, 2·steps network evaluations. Runs on the teacher's
    device; the result comes back on z's device, in z's dtype."""
    sigmas = karras_sigmas(steps + 1, sigma_min, sigma_max)
    x = (z * sigma_max).to(device=teacher.device, dtype=teacher.dtype)
    labels = None if labels is None else labels.to(teacher.device)
    return heun_solve(teacher, x, sigmas.tolist(), labels, progress=progress).to(device=z.device, dtype=z.dtype)
