"""Samples off the modes of a Gaussian mixture: the fraction beyond n σ of the nearest mode.

For components N(μ_k, diag(c_k²)) a sample x is m_k(x) component-σ units from mode k, its
Mahalanobis distance

    m_k(x) = √( Σ_i (x_i − μ_ki)² / c_ki² )        (isotropic components: ‖x − μ_k‖ / c_k),

and it lies beyond n σ when it is outside the n-σ ellipsoid of every mode:

    beyond_n(x) = [ min_k m_k(x) > n ],     fraction = mean over the samples.

For exact samples of one d-dimensional component m² ~ χ²_d, so the fraction is P(χ²_d > n²): in 2-D
exp(−n²/2), 0.0111 for n = 3. For a mixture whose n-σ ellipsoids do not overlap it is slightly less
(a sample far from its own mode may fall near another). Samples a distilled student spreads between
modes (streaks, bridges) raise it, which alignment RMS, an average, hardly shows. In high dimension
m² concentrates around d, so the fraction of exact samples approaches 1 there: compare a student with
the exact law's own fraction, never with the 2-D figure.
"""

from __future__ import annotations

import torch

from apctl.errors import ApctlError


def nearest_mode_distance(samples: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """min_k m_k(x) per sample, float64 (B,): samples (B, …) flattened to d, means and variances (K, d)."""
    x = samples.reshape(samples.shape[0], -1).double().cpu()
    means, variances = means.double().cpu(), variances.double().cpu()
    if means.shape != variances.shape or means.shape[1] != x.shape[1]:
        raise ApctlError(f"mode distance: samples of dimension {x.shape[1]} against means {tuple(means.shape)} "
                         f"and variances {tuple(variances.shape)}")
    if not bool((variances > 0).all()):
        raise ApctlError("mode distance needs every component to have a positive std (a Dirac has no σ)")
    inv_v = 1.0 / variances
    # Σ_i (x_i − μ_ki)²/v_ki expanded into (B, K) products, as the teacher computes its responsibilities.
    quad = (x ** 2) @ inv_v.T - 2.0 * x @ (means * inv_v).T + (means ** 2 * inv_v).sum(1)
    return quad.clamp_min(0.0).min(dim=1).values.sqrt()


def fraction_beyond(samples: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, n_sigma: float = 3.0) -> float:
    """The fraction of samples more than `n_sigma` component-σ from every mode (module docstring)."""
    return float((nearest_mode_distance(samples, means, variances) > n_sigma).double().mean())


__all__ = ["fraction_beyond", "nearest_mode_distance"]
