"""Per-sample distances d(a, b) → (B,) between student and target outputs."""

from __future__ import annotations

import torch
from torch import nn

from apctl.config import DistanceConfig


class SquaredL2(nn.Module):
    """d(a, b) = mean_i (a_i − b_i)²  (per dimension, so losses are comparable across data sizes)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).float().pow(2).flatten(1).mean(1)


class PseudoHuber(nn.Module):
    """d(a, b) = √(‖a − b‖²/dim + c²) − c  (Song & Dhariwal 2023, per-dimension scale)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a - b).float().pow(2).flatten(1).mean(1)
        return (sq + self.c ** 2).sqrt() - self.c


def build_distance(cfg: DistanceConfig) -> nn.Module:
    """The distance of the `[objective.distance]` section."""
    if cfg.kind == "l2":
        return SquaredL2()
    if cfg.kind == "pseudo_huber":
        return PseudoHuber(cfg.huber_c)
    if cfg.kind == "lpips":
        from apctl.objectives.lpips_distance import LPIPSDistance

        return LPIPSDistance(net=cfg.lpips_net, trunk_path=cfg.lpips_trunk or None, pooling=cfg.lpips_pooling)
    raise ValueError(f"unknown distance {cfg.kind!r}")
