"""A two-time MLP denoiser for low-dimensional data, with EDM's inner preconditioning.

    D_θ(x, t, s, y) = c_skip(t)·x + c_out(t)·F_θ(g·c_in(t)·x, c_noise(t), c_noise(s), y)

F_θ is an MLP over [g·c_in·x, emb(t), emb(s), W_y·y] with SiLU units (ReLU with `activation`), where
emb is a sinusoidal embedding of c_noise = ¼·ln σ and g is a fixed input gain (`input_gain`, default
1). The last layer starts at zero, so at initialisation D_θ = c_skip·x: the denoiser of N(0, σ_d²·I),
a sensible prior for data scaled to std ≈ σ_d.

A gain g is the same as first-layer weights on x initialised g× larger and, under Adam, moved g×
faster: the units start as sharp ramps of x rather than gentle ones next to the 2·embed_dim time
features, which is what a map with sharp region boundaries (a few-step jump onto separated modes)
needs (docs/benchmarks.md, "The input gain and the held rate").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from apctl.schedules import SIGMA_DATA, c_in, c_noise, c_out, c_skip


ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}


class SinusoidalEmbedding(nn.Module):
    """[B] → [B, dim]: cos and sin of the input at geometrically spaced frequencies lowest … highest
    (default 1 … 1000)."""

    def __init__(self, dim: int, lowest: float = 1.0, highest: float = 1000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.linspace(math.log(lowest), math.log(highest), half))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angle = c[:, None].float() * self.freqs[None]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class TwoTimeMLP(nn.Module):
    def __init__(self, shape: tuple[int, ...], label_dim: int = 0, hidden: int = 256, depth: int = 4,
                 embed_dim: int = 64, sigma_data: float = SIGMA_DATA, input_gain: float = 1.0,
                 activation: str = "silu", time_frequencies: tuple[float, float] = (1.0, 1000.0)):
        super().__init__()
        self.input_gain = input_gain
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.embed = SinusoidalEmbedding(embed_dim, *time_frequencies)
        width_in = self.dim + 2 * (embed_dim // 2) * 2 + (hidden if label_dim else 0)
        self.label_embed = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), ACTIVATIONS[activation]()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, self.dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def output_weight(self) -> nn.Parameter:
        """The weight of the last layer (where CTM's adaptive DSM weight compares gradient norms)."""
        return self.head.weight

    def network(self, x_in: torch.Tensor, t_in: torch.Tensor, s_in: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """F_θ = head(body([x_in, emb(t_in), emb(s_in), W_y·y])): x_in [B, dim] the scaled input (g·c_in·x here),
        t_in and s_in [B] the values the time embedding sees."""
        features = [x_in, self.embed(t_in), self.embed(s_in)]
        if self.label_embed is not None:
            features.append(self.label_embed(labels.float()))
        return self.head(self.body(torch.cat(features, dim=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        t = t.float().reshape(-1, 1)
        s = s.float().reshape(-1)
        F = self.network(self.input_gain * c_in(t, self.sigma_data) * flat, c_noise(t.reshape(-1)), c_noise(s), labels)
        D = c_skip(t, self.sigma_data) * flat + c_out(t, self.sigma_data) * F
        return D.reshape(x.shape).to(x.dtype)
