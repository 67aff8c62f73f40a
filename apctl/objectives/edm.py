"""EDM's denoiser training loss (Karras et al. 2022, eq. 8 and Table 1; NVlabs/edm `training/loss.py`
EDMLoss), the objective of `apctl teacher train`:

    ln σ ~ N(P_mean, P_std²),   n ~ N(0, σ²I)
    loss = mean_batch  λ(σ)·Σ_i (D_θ(x_0 + n, σ, y) − x_0)_i²,     λ(σ) = (σ² + σ_d²)/(σ·σ_d)²

summed over pixels and averaged over the batch, as EDM's training loop does. The network is a
one-time EDM denoiser D_θ(x, σ, labels) (e.g. EDMPrecond around a SongUNet).
"""

from __future__ import annotations

import torch
from torch import nn

from apctl.draws import as_draws
from apctl.schedules import SIGMA_DATA


class EDMObjective:
    name = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def to(self, device) -> "EDMObjective":
        return self

    def __call__(self, net: nn.Module, target, x0: torch.Tensor, labels, gen: torch.Generator,
                 shared_gen: torch.Generator, step: int = 0):
        shape = (-1,) + (1,) * (x0.dim() - 1)
        draws = as_draws(gen, x0.shape[0])     # a torch.Generator or a step's per-sample draws
        sigma = (draws.randn() * self.p_std + self.p_mean).exp().to(x0.device)
        noise = draws.randn(x0.shape[1:]).to(x0)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        denoised = net(x0 + sigma.to(x0.dtype).view(shape) * noise, sigma, labels)
        loss = (weight * (denoised - x0).float().pow(2).flatten(1).sum(1)).mean()
        return loss, {"loss": loss.detach()}
