"""On-device (f, g) for every jump between two levels of the training grid.

Training only ever jumps between grid levels t_a ≥ t_b (including t → σ_min, the last level), so
the coefficients of all N(N+1)/2 pairs are computed once, in float64 from the exact grid values,
and looked up by grid index inside the training step: no host round trip, no per-step integration.
Off-grid jumps (sampling) use `preconditioning.jump`, which keeps the float64 path.
"""

from __future__ import annotations

import numpy as np
import torch

from apctl.preconditioning.coefficients import Preconditioning


class CoefficientTable:
    """f[a, b], g[a, b] for grid levels a ≤ b (t = grid[a] ≥ s = grid[b]); zero below the diagonal."""

    def __init__(self, precond: Preconditioning, grid: np.ndarray, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        grid = np.asarray(grid, dtype=np.float64)
        n = len(grid)
        a, b = np.triu_indices(n)
        f, g = precond.coefficients(torch.from_numpy(grid[a]), torch.from_numpy(grid[b]))
        F = torch.zeros(n, n, dtype=torch.float64)
        G = torch.zeros(n, n, dtype=torch.float64)
        F[a, b], G[a, b] = f, g
        self.f = F.to(device=device, dtype=dtype)
        self.g = G.to(device=device, dtype=dtype)
        self.sigma = torch.from_numpy(grid).to(device=device, dtype=dtype)   # σ as the networks see it

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, g) per sample for index tensors a ≤ b of shape (B,)."""
        return self.f[a, b], self.g[a, b]


def jump_on_grid(table: CoefficientTable, net, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """G(x, t_a, t_b) = f(t_a, t_b)·x + g(t_a, t_b)·D(x, t_a, t_b) for per-sample grid indices a ≤ b."""
    f, g = table(a, b)
    shape = (-1,) + (1,) * (x.dim() - 1)
    D = net(x, table.sigma[a], table.sigma[b], labels)
    return f.to(x.dtype).view(shape) * x + g.to(x.dtype).view(shape) * D
