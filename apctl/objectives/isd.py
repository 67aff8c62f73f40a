"""iSD, improved self-distillation of flow maps (Kim, Kim, Kim, Park 2026), as
SNU-VGILab/improvedSelfDistillation's `methods/isd.py` trains it (docs/reference_code.md, "iSD"),
from scratch on data, with no teacher and no target network:

    t, s     ~ Beta(a, 1) per sample (a = 0.8), then t ← max, s ← min; drawn as u^(1/a)
    labels   the last round(p·B) rows of the global batch get no class (p = label_dropout)
    x_t, v   the interpolant and its conditional velocity (networks/flow_map.py: linear or trig)
    FM       F_θ(x_t, t, t, y) against v_w = u + w·(v − u),  u = sg F_θ(x_t, t, t, ∅)       (w = guidance)
    v̂        = sg F_θ(x_t, t, t, y)                                 the model's own marginal velocity
    dF       = d/dλ F_θ(x_t + λ·v̂, t + λ·ṫ, s, y) at λ = 0, no gradient: the central difference
               [F(x_t + ε·v̂, t + ε·ṫ) − F(x_t − ε·v̂, t − ε·ṫ)]/(2ε) or a forward-mode JVP
               (ṫ = 1; trig "consistent": ṫ = 1/1.57, the flow's rate per unit τ)
    T        = sg[F + dX_θ/dt]: linear v̂ − (t − s)·dF;  trig F + cos Δ·(v̂ − F) − sin Δ·(x_t + dF)
    SD       F_θ(x_t, t, s, y) against T
    ℓ        = mean_i (F_θ(x_t, t, t) − v_w)_i² + mean_i (F_θ(x_t, t, s) − T)_i²   per sample
    loss     = mean_batch ℓ / sg(ℓ + c)^p                                 (c = 0.01, p = 1)

The self-distillation goal T is the map's value moved back along the model's own flow: T = F exactly
when X_θ(x, t, s) does not change as (x, t) follows the flow, i.e. when X_θ is the flow map of the
learnt velocity; at s = t, T = v̂ and the SD term vanishes. The network is F_θ itself (`student(…,
velocity=True)`); the engine samples the same map as a two-time denoiser in σ (networks/flow_map.py).
Differences from the reference code: docs/math.md, "iSD".
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apctl.config import ISDObjectiveConfig
from apctl.draws import as_draws
from apctl.errors import ApctlError
from apctl.networks.flow_map import TRIG_RATE
from apctl.training.distributed import unwrap


def beta_a1(draws, a: float) -> torch.Tensor:
    """One draw per row from Beta(a, 1), by its inverse CDF: F(x) = x^a, so x = u^(1/a)."""
    return draws.rand(dtype=torch.float64).pow(1.0 / a)


def no_class_rows(draws, fraction: float) -> torch.Tensor:
    """Rows that train without a class: the last round(fraction·B) rows of the global batch of B (the
    reference drops the last rows of its batch), whichever micro-batch holds them."""
    return draws.rows() >= draws.total - round(fraction * draws.total)


def tangent(net: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels, direction: torch.Tensor,
            t_rate: float, method: str, epsilon: float) -> torch.Tensor:
    """d/dλ F(x + λ·direction, t + λ·t_rate, s) at λ = 0, without gradient, in at least float32 and outside
    autocast (a bf16 difference has no digits left); `net` takes (x_t, t, s, labels) and returns F."""
    work = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x, direction, t, s = x.to(work), direction.to(work), t.to(work), s.to(work)
        if method == "jvp":
            return torch.func.jvp(lambda x_, t_: net(x_, t_, s, labels), (x, t),
                                  (direction, torch.full_like(t, t_rate)))[1]
        step = epsilon * t_rate
        ahead = net(x + epsilon * direction, t + step, s, labels)
        behind = net(x - epsilon * direction, t - step, s, labels)
        return (ahead - behind) / (2 * epsilon)


class ISDObjective:
    name = "isd"
    progress_terms = ("fm", "sd")   # what the progress line shows: the adaptively normalised total stays near 1

    def __init__(self, cfg: ISDObjectiveConfig):
        self.cfg = cfg

    def to(self, device) -> "ISDObjective":
        return self

    def t_rate(self, transport) -> float:
        """ṫ of the tangent: 1, or 1/1.57 for the trig transport with trig_tangent = "consistent"."""
        consistent = transport.name == "trig" and self.cfg.trig_tangent == "consistent"
        return 1.0 / TRIG_RATE if consistent else 1.0

    def __call__(self, student: nn.Module, target, x0: torch.Tensor, labels, gen, shared_gen, step: int = 0):
        """(loss, logs); `target` is not used: iSD has no θ⁻ (module docstring)."""
        cfg, net = self.cfg, unwrap(student)
        transport = net.transport
        shape = (-1,) + (1,) * (x0.dim() - 1)
        draws = as_draws(gen, x0.shape[0])
        first, second = beta_a1(draws, cfg.time_beta_a), beta_a1(draws, cfg.time_beta_a)
        t = torch.maximum(first, second).to(device=x0.device, dtype=x0.dtype)
        s = torch.minimum(first, second).to(device=x0.device, dtype=x0.dtype)
        z = draws.randn(x0.shape[1:]).to(x0)
        if labels is not None and cfg.label_dropout > 0:
            keep = ~no_class_rows(draws, cfg.label_dropout).to(x0.device)
            labels = labels * keep.to(labels.dtype).view(-1, 1)        # a zero vector: no class
        elif labels is None and cfg.guidance != 1:
            raise ApctlError("objective.isd.guidance ≠ 1 needs class labels (the data set here has none)")
        alpha, beta = transport.coefficients(t.view(shape))
        x_t = alpha * x0 + beta * z
        v = transport.velocity(x0, z, t.view(shape))

        diagonal = student(x_t, t, t, labels, velocity=True)
        if cfg.guidance != 1:        # with w = 1 the goal is v itself: the no-class pass is skipped
            with torch.no_grad():
                u = net(x_t, t, t, torch.zeros_like(labels), velocity=True)
            v = u + cfg.guidance * (v - u)
        fm = (diagonal - v).to(torch.promote_types(v.dtype, torch.float32)).pow(2).flatten(1).mean(1)

        v_hat = diagonal.detach()
        F = student(x_t, t, s, labels, velocity=True)
        dF = tangent(lambda *a: net(*a, velocity=True), x_t, t, s, labels, v_hat,
                     self.t_rate(transport), cfg.tangent, cfg.epsilon)
        work = dF.dtype
        with torch.no_grad():
            goal = transport.eulerian_target(F.detach().to(work), v_hat.to(work), x_t.to(work), dF,
                                             t.view(shape).to(work), s.view(shape).to(work))
        sd = (F.to(work) - goal).pow(2).flatten(1).mean(1)

        per_sample = fm + sd
        loss = (per_sample / (per_sample.detach() + cfg.adaptive_c) ** cfg.adaptive_p).mean()
        return loss, {"loss": loss.detach(), "fm": fm.detach().mean(), "sd": sd.detach().mean()}


__all__ = ["ISDObjective", "beta_a1", "no_class_rows", "tangent"]
