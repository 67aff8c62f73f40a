"""EDM noise levels, the Karras grid and EDM's inner network preconditioning.

The forward process is x_σ = x_0 + σ·ε (Karras et al. 2022), so the PF-ODE is
dx/dσ = (x − D(x, σ))/σ and, in the half log-SNR λ = −ln σ, dx/dλ = D(x, λ) − x.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from apctl.errors import ApctlError

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> np.ndarray:
    """t_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i = 0 … n−1, decreasing, float64."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    ramp = np.arange(n, dtype=np.float64) / (n - 1)
    inv_rho = 1.0 / rho
    return (sigma_max ** inv_rho + ramp * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho


def c_skip(sigma, sigma_data: float = SIGMA_DATA):
    """EDM: c_skip(σ) = σ_d² / (σ² + σ_d²)."""
    return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def c_out(sigma, sigma_data: float = SIGMA_DATA):
    """EDM: c_out(σ) = σ·σ_d / √(σ² + σ_d²)."""
    return sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5


def c_in(sigma, sigma_data: float = SIGMA_DATA):
    """EDM: c_in(σ) = 1 / √(σ² + σ_d²)."""
    return 1.0 / (sigma ** 2 + sigma_data ** 2) ** 0.5


def c_noise(sigma):
    """EDM: c_noise(σ) = ¼·ln σ."""
    return 0.25 * (sigma.log() if hasattr(sigma, "log") else np.log(sigma))


def snap_to_grid(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The grid point nearest (in ln σ) to each value."""
    values = np.asarray(values, dtype=np.float64)
    idx = np.abs(np.log(values)[:, None] - np.log(grid)[None, :]).argmin(axis=1)
    return grid[idx]


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """A sampler's σ list as floats: at least two levels, positive, finite and strictly decreasing (else one
    ApctlError). Torch-free, so that the config check of `[eval.levels]` can read the same rule."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ApctlError("a σ list needs at least two levels (start and end)")
    if any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise ApctlError(f"σ levels must be positive numbers, got {sigmas}")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ApctlError(f"σ levels must strictly decrease, got {sigmas}")
    return sigmas
