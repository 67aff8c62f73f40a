"""Consistency distillation objectives on the discrete Karras grid t_0 = σ_max > … > t_{N−1} = σ_min.

CTM (Kim et al. 2024), as sony/ctm trains it (docs/math.md, "CTM as the reference code trains it"):

    k        one per step, shared by all ranks:  p(k) ∝ k on 1…K   ("weighted"; "uniform": per sample,
             i ~ U{0…N−2} first, then k ~ U{1…min(K, N−1−i)})
    i, j     per sample:  i ~ U{0 … N−1−k},  j ~ U{i+k … N−1};   t = t_i, u = t_{i+k}, s = t_j
    x_t      = x_0 + t·ε
    x̂_u      = k teacher Heun steps t → u along the grid from x_t                         (no grad)
    estimate = G_{θ⁻}(G_θ(x_t, t, s), s, σ_min)          gradient into θ through the outer jump's input
    target   = G_{θ⁻}(G_θ̄(x̂_u, u, s), s, σ_min)          no grad; θ̄ = θ ("student", CTM's model_sg) or θ⁻
    DSM      = w(σ)·mean_i (D_θ(x_0 + σ·ε', σ, σ) − x_0)²,  w(σ) = (σ² + σ_d²)/(σ·σ_d)²  (EDM's weight)
               σ: rows of odd global index ln σ ~ N(−1.2, 1.2²), even ones σ = ramp(r), r ~ U[0, 0.7)
               on the Karras ρ-ramp ("halflognormal": CTM's half and half — ⌊b/2⌋ lognormal rows in
               any b rows from an even index — in every micro-batch; "lognormal": every row)
    loss     = mean d(estimate, target) + mean λ·DSM,
               λ = clamp(‖∇_W L_CTM‖ / (‖∇_W L_DSM‖ + 1e-4), 0, 1e4), W the student's output layer
               (recomputed every step, detached; "fixed": λ = dsm_weight)

CD (Song et al. 2023), the single-step slice with a one-step teacher:
    i ~ U{0 … N−2},  t = t_i, u = t_{i+1}
    loss = mean d(G_θ(x_t, t, σ_min), G_{θ⁻}(x̂_u, u, σ_min))

G(x, t_a, t_b) = f·x + g·D(x, t_a, t_b) with (f, g) looked up in the run's on-device coefficient
table (computed once, in float64, for every pair of grid levels). Jumps to σ_min are made for every
row, including rows already at σ_min, where G is the identity (f = 1, g = 0) — as in CTM's code,
and without a data-dependent branch. Nothing in a step reads a device value on the host.
Each objective returns (loss, logs) with logs as detached device tensors. Per-sample draws come from
`gen`, a CPU torch.Generator or a training step's per-sample draws (apctl/draws.py: a sample's values
depend on its index in the global batch, not on the micro-batch it is computed in).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from apctl.config import ObjectiveConfig
from apctl.draws import as_draws
from apctl.errors import ApctlError
from apctl.objectives.distances import build_distance
from apctl.objectives.kinds import uses_distance
from apctl.preconditioning.table import CoefficientTable, jump_on_grid
from apctl.sampling import heun_chain
from apctl.schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, karras_sigmas
from apctl.training.distributed import unwrap

P_MEAN, P_STD = -1.2, 1.2
RHO = 7.0
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


def weighted_teacher_steps(K: int, shared_gen: torch.Generator) -> int:
    """CTM's `heun_step_strategy = "weighted"`: one k ~ p(k) = k / Σ_{m≤K} m on 1…K (a host integer)."""
    weights = torch.arange(1, K + 1, dtype=torch.float64)
    return int(torch.multinomial(weights, 1, generator=shared_gen)) + 1


def ctm_indices(N: int, K: int, batch: int, law: str, gen: torch.Generator, shared_gen: torch.Generator):
    """(i, k, j) per sample as CPU long tensors, and the host integer max(k) (the chain length to run).

    weighted: k shared by the batch (from `shared_gen`, equal on every rank), i ~ U{0…N−1−k}, j ~ U{i+k…N−1}.
    uniform:  i ~ U{0…N−2}, k ~ U{1…min(K, N−1−i)}, j ~ U{i+k…N−1}, all per sample.
    """
    draws = as_draws(gen, batch)
    if law == "weighted":
        k_max = weighted_teacher_steps(min(K, N - 1), shared_gen)
        k = torch.full((batch,), k_max, dtype=torch.long)
        i = (draws.rand(dtype=torch.float64) * (N - k)).long()
    elif law == "uniform":
        i = draws.randint(N - 1)
        k_top = torch.clamp(N - 1 - i, max=K)
        k = 1 + (draws.rand(dtype=torch.float64) * k_top).long()
        k_max = int(k.max())
    else:
        raise ApctlError(f"unknown teacher-step law {law!r}")
    j = i + k + (draws.rand(dtype=torch.float64) * (N - i - k)).long()
    return i, k, j, k_max


def dsm_sigmas(batch: int, law: str, uniform_fraction: float, gen) -> torch.Tensor:
    """σ of the DSM term (float64, CPU): CTM's "halflognormal" or EDM's "lognormal" (see module docstring).
    Which half a row belongs to is the parity of its index in the (global) batch, so a row's σ does not
    depend on the micro-batch it falls in, and every micro-batch is half and half as in CTM's code."""
    draws = as_draws(gen, batch)
    sigma = (draws.randn(dtype=torch.float64) * P_STD + P_MEAN).exp()
    if law == "halflognormal":
        r = draws.rand(dtype=torch.float64) * uniform_fraction
        ramp = (SIGMA_MAX ** (1 / RHO) + r * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
        sigma = torch.where(draws.rows() % 2 == 1, sigma, ramp)
    elif law != "lognormal":
        raise ApctlError(f"unknown DSM σ law {law!r}")
    return sigma


def adaptive_weight(loss_a: torch.Tensor, loss_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """λ = clamp(‖∇_W loss_a‖ / (‖∇_W loss_b‖ + 1e-4), 0, 1e4), detached (CTM's DSM balance; VQGAN's rule)."""
    grad_a, = torch.autograd.grad(loss_a, weight, retain_graph=True)
    grad_b, = torch.autograd.grad(loss_b, weight, retain_graph=True)
    ratio = grad_a.float().norm() / (grad_b.float().norm() + ADAPTIVE_EPS)
    return ratio.clamp(0.0, ADAPTIVE_MAX).detach()


class _GridObjective:
    def __init__(self, teacher, precond, grid: np.ndarray, distance: nn.Module):
        self.teacher = teacher
        self.precond = precond
        self.grid = torch.as_tensor(np.asarray(grid, dtype=np.float64))
        self.distance = distance
        self.table = CoefficientTable(precond, self.grid.numpy())
        self.last = len(grid) - 1            # the index of σ_min

    def to(self, device) -> "_GridObjective":
        """Move the coefficient table and the distance network to `device`; returns self."""
        self.table = CoefficientTable(self.precond, self.grid.numpy(), device)
        self.distance.to(device)
        return self

    def _teacher(self, x, sigma, labels):
        return self.teacher(x.to(self.teacher.dtype), sigma.to(self.teacher.dtype), labels).to(x.dtype)

    @torch.no_grad()
    def teacher_steps(self, x: torch.Tensor, start: torch.Tensor, steps: torch.Tensor | None, k_max: int, labels) -> torch.Tensor:
        """Per sample, `steps[b]` Heun steps along the grid from index `start[b]` (`heun_chain`; `steps = None`
        means every row takes k_max steps, CTM's law)."""
        return heun_chain(self._teacher, x, self.table.sigma, start, k_max, steps, labels)

    def to_sigma_min(self, net, x, s_index, labels):
        """G(x, t_{s_index}, σ_min) for every row (the identity where s_index is already σ_min)."""
        return jump_on_grid(self.table, net, x, s_index, torch.full_like(s_index, self.last), labels)


class CTMObjective(_GridObjective):
    name = "ctm"

    def __init__(self, teacher, precond, grid, distance, max_teacher_steps: int = 17, teacher_steps_law: str = "weighted",
                 dsm_weighting: str = "adaptive", dsm_weight: float = 1.0, dsm_sigma_law: str = "halflognormal",
                 dsm_uniform_fraction: float = 0.7, target_inner: str = "student", sigma_data: float = SIGMA_DATA):
        super().__init__(teacher, precond, grid, distance)
        self.max_teacher_steps = max_teacher_steps
        self.teacher_steps_law = teacher_steps_law
        self.dsm_weighting = dsm_weighting
        self.dsm_weight = dsm_weight
        self.dsm_sigma_law = dsm_sigma_law
        self.dsm_uniform_fraction = dsm_uniform_fraction
        self.target_inner = target_inner
        self.sigma_data = sigma_data

    def sample_indices(self, batch: int, gen: torch.Generator, shared_gen: torch.Generator):
        return ctm_indices(len(self.grid), self.max_teacher_steps, batch, self.teacher_steps_law, gen, shared_gen)

    def draw_start(self, x0: torch.Tensor, draws, shared_gen):
        """(x_t, i, k, j, k_max): the indices (i, k, j) on x0's device, then x_t = x_0 + t_i·ε."""
        i, k, j, k_max = (v.to(x0.device, non_blocking=True) if torch.is_tensor(v) else v
                          for v in self.sample_indices(x0.shape[0], draws, shared_gen))
        eps = draws.randn(x0.shape[1:]).to(x0)
        t = self.table.sigma[i].to(x0.dtype).view((-1,) + (1,) * (x0.dim() - 1))
        return x0 + t * eps, i, k, j, k_max

    def consistency(self, student: nn.Module, target: nn.Module, x0: torch.Tensor, labels, draws, shared_gen) -> torch.Tensor:
        """mean d(G_{θ⁻}(G_θ(x_t, t, s), s, σ_min), G_{θ⁻}(G_θ̄(x̂_u, u, s), s, σ_min)) (module docstring)."""
        x_t, i, k, j, k_max = self.draw_start(x0, draws, shared_gen)
        x_u = self.teacher_steps(x_t, i, k if self.teacher_steps_law == "uniform" else None, k_max, labels)

        inner = jump_on_grid(self.table, student, x_t, i, j, labels)
        estimate = self.to_sigma_min(target, inner, j, labels)
        with torch.no_grad():
            inner_net = unwrap(student) if self.target_inner == "student" else target
            goal = self.to_sigma_min(target, jump_on_grid(self.table, inner_net, x_u, i + k, j, labels), j, labels)
        return self.distance(estimate, goal).mean()

    def dsm(self, student: nn.Module, x0: torch.Tensor, labels, draws) -> torch.Tensor:
        """mean w(σ)·mean_i (D_θ(x_0 + σ·ε', σ, σ) − x_0)², EDM's weight w(σ) = (σ² + σ_d²)/(σ·σ_d)²."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        sigma = dsm_sigmas(x0.shape[0], self.dsm_sigma_law, self.dsm_uniform_fraction, draws).to(device=x0.device, dtype=torch.float32)
        noise = draws.randn(x0.shape[1:]).to(x0)
        denoised = student(x0 + sigma.to(x0.dtype).view(shape) * noise, sigma, sigma, labels)
        w = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return (w * (denoised - x0).float().pow(2).flatten(1).mean(1)).mean()

    def __call__(self, student: nn.Module, target: nn.Module, x0: torch.Tensor, labels, gen: torch.Generator,
                 shared_gen: torch.Generator, step: int = 0):
        draws = as_draws(gen, x0.shape[0])   # the consistency term draws first, then the DSM term
        consistency = self.consistency(student, target, x0, labels, draws, shared_gen)
        dsm = self.dsm(student, x0, labels, draws)
        if self.dsm_weighting == "adaptive":
            lam = adaptive_weight(consistency, dsm, unwrap(student).output_weight())
        else:
            lam = torch.tensor(self.dsm_weight, device=x0.device)
        loss = consistency + lam * dsm
        return loss, {"loss": loss.detach(), "ctm": consistency.detach(), "dsm": dsm.detach(), "dsm_weight": lam}


class CDObjective(_GridObjective):
    name = "cd"

    def __call__(self, student: nn.Module, target: nn.Module, x0: torch.Tensor, labels, gen: torch.Generator,
                 shared_gen: torch.Generator, step: int = 0):
        B, device = x0.shape[0], x0.device
        shape = (-1,) + (1,) * (x0.dim() - 1)
        draws = as_draws(gen, B)
        i = draws.randint(len(self.grid) - 1).to(device, non_blocking=True)
        eps = draws.randn(x0.shape[1:]).to(x0)
        x_t = x0 + self.table.sigma[i].to(x0.dtype).view(shape) * eps
        x_u = self.teacher_steps(x_t, i, None, 1, labels)
        estimate = self.to_sigma_min(student, x_t, i, labels)
        with torch.no_grad():
            goal = self.to_sigma_min(target, x_u, i + 1, labels)
        loss = self.distance(estimate, goal).mean()
        return loss, {"loss": loss.detach()}


def build_objective(cfg: ObjectiveConfig, teacher, precond):
    """The objective of the `[objective]` section: shared keys here, the kind's own keys from its section."""
    grid = karras_sigmas(cfg.grid_points)
    distance = build_distance(cfg.distance) if uses_distance(cfg) else None
    if cfg.kind == "ctm":
        c = cfg.ctm
        return CTMObjective(teacher, precond, grid, distance, c.max_teacher_steps, c.teacher_steps_law,
                            c.dsm_weighting, c.dsm_weight, c.dsm_sigma_law, c.dsm_uniform_fraction, c.target_inner)
    if cfg.kind == "cd":
        return CDObjective(teacher, precond, grid, distance)
    if cfg.kind == "ect":
        from apctl.objectives.ect import ECTObjective

        return ECTObjective(cfg.ect)
    if cfg.kind == "isd":
        from apctl.objectives.isd import ISDObjective

        return ISDObjective(cfg.isd)
    if cfg.kind == "edm":
        from apctl.objectives.edm import EDMObjective

        return EDMObjective(cfg.edm.p_mean, cfg.edm.p_std)
    raise ApctlError(f"unknown objective {cfg.kind!r}")


__all__ = ["CDObjective", "CTMObjective", "adaptive_weight", "build_objective", "ctm_indices", "dsm_sigmas",
           "weighted_teacher_steps"]
