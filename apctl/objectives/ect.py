"""ECT, easy consistency tuning (Geng et al. 2025, "Consistency models made easy"), as locuslab/ect's
code trains it (`training/loss.py` ECMLoss; docs/reference_code.md, "ECT"):

    stage    j = ⌊step / stage_iterations⌋
    t        ln t ~ N(P_mean, P_std²), per sample, not clipped to [σ_min, σ_max]
    r        = max(0, t·(1 − n(t)/q^(j+1))),   n(t) = 1 + k·sigmoid(−b·t)  ("sigmoid"; "const": n ≡ 1)
    x_t, x_r = x_0 + t·ε,  x_0 + r·ε                                         (one ε for both)
    goal     = x_0 where r = 0, else D_θ(x_r, r) without gradient, in train mode, with the dropout masks
               of the estimate's pass (torch's generators are rewound to where that pass began)
    d        = √(Σ_i (D_θ(x_t, t) − goal)_i² + c²) − c                     (over every pixel; c = 0: ‖·‖₂)
    loss     = mean_batch w·d,   w = 1/(t − r) ("gap", CIFAR-10) or 1/t² + 1/σ_d² ("edm", ImageNet-64)

r = 0 makes the goal the clean image: the early stages are mostly denoising, and each stage halves
(q = 2) the gap Δt/t towards consistency training on the model's own ODE.

D_θ(x, t) is a one-time denoiser, ECT's consistency function. apctl trains it as the two-time UNet
student D_θ(x, t, s) whose s-embedding the run freezes at zero (`TwoTimeDenoiser.freeze_s_embedding`),
so D_θ(x, t, s) = D_θ(x, t) for every s and the jump G(x, t, s) = f·x + g·D_θ(x, t) of the run's
preconditioning samples it (CTM's coefficients make that DDIM with the consistency function's x̂₀).
There is no teacher in the loss and no target network θ⁻; the teacher's network only initialises the
student. Differences from the reference code: docs/math.md, "ECT".
"""

from __future__ import annotations


import torch
from torch import nn

from apctl.config import ECTObjectiveConfig
from apctl.draws import as_draws
from apctl.schedules import SIGMA_DATA, SIGMA_MIN
from apctl.training.distributed import unwrap


def stage_of(step: int, stage_iterations: int) -> int:
    """j = ⌊step / stage_iterations⌋: the stage of the gap schedule at iteration `step` (0-based)."""
    return step // stage_iterations


def gap_ratio(t: torch.Tensor, stage: int, cfg: ECTObjectiveConfig) -> torch.Tensor:
    """Δt/t = n(t)/q^(stage+1), n(t) = 1 + k·sigmoid(−b·t) ("sigmoid") or 1 ("const")."""
    n = 1 + cfg.k * torch.sigmoid(-cfg.b * t) if cfg.mapping == "sigmoid" else torch.ones_like(t)
    return n / cfg.q ** (stage + 1)


def r_of_t(t: torch.Tensor, stage: int, cfg: ECTObjectiveConfig) -> torch.Tensor:
    """r = max(0, t·(1 − Δt/t)): the nearer time of the pair; 0 where the gap covers all of t."""
    return (t * (1 - gap_ratio(t, stage, cfg))).clamp(min=0)


def same_dropout_masks(device: torch.device):
    """A context after which torch's generators (the CPU one, and `device`'s if it is a GPU) are back
    where they were on entry: a pass inside it and the next pass after it draw the same dropout masks."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class ECTObjective:
    name = "ect"

    def __init__(self, cfg: ECTObjectiveConfig, sigma_data: float = SIGMA_DATA):
        self.cfg = cfg
        self.sigma_data = sigma_data

    def to(self, device) -> "ECTObjective":
        return self

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """w(t, r) = 1/(t − r) ("gap") or 1/t² + 1/σ_d² ("edm")."""
        if self.cfg.weighting == "gap":
            return 1 / (t - r)
        return 1 / t ** 2 + 1 / self.sigma_data ** 2

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """d(a, b) = √(Σ_i (a − b)_i² + c²) − c per sample (c = 0: the Euclidean norm)."""
        sq = (a - b).float().pow(2).flatten(1).sum(1)
        c = self.cfg.huber_c
        return (sq + c ** 2).sqrt() - c if c > 0 else sq.sqrt()

    def __call__(self, student: nn.Module, target, x0: torch.Tensor, labels, gen, shared_gen, step: int = 0):
        """(loss, logs) of iteration `step` (module docstring); `target` (θ⁻) is not used: ECT has none."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        draws = as_draws(gen, x0.shape[0])
        t = (draws.randn(dtype=torch.float64) * self.cfg.p_std + self.cfg.p_mean).exp()
        r = r_of_t(t, stage_of(step, self.cfg.stage_iterations), self.cfg)
        eps = draws.randn(x0.shape[1:]).to(x0)
        t, r = t.to(device=x0.device, dtype=torch.float32), r.to(device=x0.device, dtype=torch.float32)
        s = torch.full_like(t, SIGMA_MIN)     # any s: the frozen s-embedding makes D_θ one-time
        clean = r == 0
        r_net = torch.where(clean, t, r)      # a valid time for rows whose goal is x_0 (their output is unused)
        with same_dropout_masks(x0.device):
            estimate = student(x0 + t.to(x0.dtype).view(shape) * eps, t, s, labels)
        with torch.no_grad():
            goal = unwrap(student)(x0 + r_net.to(x0.dtype).view(shape) * eps, r_net, s, labels)
            goal = torch.where(clean.view(shape), x0, goal)
        loss = (self.weight(t, r) * self.distance(estimate, goal)).mean()
        return loss, {"loss": loss.detach(), "clean_goal_fraction": clean.float().mean()}


__all__ = ["ECTObjective", "gap_ratio", "r_of_t", "same_dropout_masks", "stage_of"]
