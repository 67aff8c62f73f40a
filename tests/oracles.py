"""Test oracles: closed forms and exact quantities that the tests compare apctl against (one copy each).

Imported as a plain module (`import oracles`): conftest.py puts this directory on sys.path (there is
deliberately no tests/__init__.py, see conftest.py).

* Karras grid and Gaussian closed forms: N(μ, diag c²) data has the exact denoiser
  D(x, t) = μ + a ⊙ (x − μ), a = c²/(c² + t²), and the exact PF-ODE flow
  Φ_{t→s}(x) = μ + √((c² + s²)/(c² + t²)) ⊙ (x − μ); for isotropic c its Analytic-Precond
  statistics are l(λ) = c²/(c² + e^{−2λ}) and s = −2l (math note §4.1).
* Exact derivatives of a Gaussian-mixture teacher (math note §4.3, per dimension, v_k = c_k² + t²,
  β_k = t²/v_k, responsibilities r_k, component posterior means m_k = x − β_k ⊙ (x − μ_k)):

      ∇D·u    = Σ_k r_k (c_k²/v_k) ⊙ u + Σ_k r_k (m_k − D)⟨m_k − D, u⟩ / t²
      tr ∇D   = Σ_k r_k Σ_i c_ki²/v_ki + Σ_k r_k ‖m_k − D‖² / t²              (variance form: no cancellation)
      ∂_t D   = Σ_k r_k (a_k − ā) m_k − Σ_k r_k (2t c_k²/v_k²) ⊙ (x − μ_k),
                a_k = −Σ_i t/v_ki + t Σ_i (x_i − μ_ki)²/v_ki²,  ā = Σ_k r_k a_k
      dD/dλ   = ∇D·(D − x) − t ∂_t D        (total derivative along the PF-ODE, λ = −ln t)

  Only tests use them (the statistics estimator differentiates any denoiser with torch.func), so they
  live here, as functions of a `GaussianMixtureTeacher`; test_gaussian_mixture.py checks them against
  autograd of an independently written log-density. Every sum over components is a (B, K) × (K, d)
  product; computation is in float64.
* The CTM index laws (Kim et al. 2024), enumerated exactly.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


# --- noise grid ------------------------------------------------------------------------------

def karras(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> np.ndarray:
    """EDM's n-level grid, σ_i = (σ_max^{1/ρ} + i/(n − 1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, decreasing, float64."""
    i = np.arange(n, dtype=np.float64)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


# --- Gaussian data N(μ, diag c²) ------------------------------------------------------------------

def _level(v, x: torch.Tensor) -> torch.Tensor:
    """A noise level as a tensor of x's dtype: a scalar, or per sample (B,) reshaped to broadcast over x."""
    v = torch.as_tensor(v, dtype=x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


def gaussian_denoiser(x: torch.Tensor, t, mu, c) -> torch.Tensor:
    """E[x_0 | x_t = x] for x_0 ~ N(μ, diag c²): μ + c²/(c² + t²) ⊙ (x − μ); t scalar or (B,)."""
    t = _level(t, x)
    return mu + c * c / (c * c + t * t) * (x - mu)


def gaussian_flow(x: torch.Tensor, t, s, mu, c) -> torch.Tensor:
    """The exact PF-ODE map from σ = t to σ = s for N(μ, diag c²): μ + √((c² + s²)/(c² + t²)) ⊙ (x − μ)."""
    t, s = _level(t, x), _level(s, x)
    return mu + torch.sqrt((c * c + s * s) / (c * c + t * t)) * (x - mu)


def gaussian_l(c: float):
    """λ ↦ l(λ) = c²/(c² + e^{−2λ}) of isotropic N(μ, c²I) (math note §4.1); there s = −2l."""
    return lambda lam: c * c / (c * c + np.exp(-2 * lam))


def gaussian_precond(c: float, form: str, **kw):
    """Analytic-Precond from the exact statistics (l, s = −2l) of isotropic N(μ, c²I)."""
    from apctl.preconditioning import AnalyticPrecond

    lf = gaussian_l(c)
    return AnalyticPrecond.from_functions(lf, lambda lam: -2 * lf(lam), form=form, **kw)


def ring_teacher(radius: float = 0.7, std: float = 0.08, centre=(0.3, -0.2), modes: int = 8, name: str = "ring"):
    """The 2-d ring mixture: `modes` equal-weight N(·, std²I) components on a circle."""
    from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher

    ang = 2 * math.pi * np.arange(modes) / modes
    means = np.stack([centre[0] + radius * np.cos(ang), centre[1] + radius * np.sin(ang)], 1)
    return GaussianMixtureTeacher(means, np.full(modes, std), name=name)


# --- exact derivatives of a Gaussian-mixture teacher ------------------------------------------

def jacobian_trace(T, x, sigma, labels=None) -> torch.Tensor:
    """tr ∇_x D(x, σ), per sample, in the variance form above."""
    return T._by_class(_jacobian_trace, x, sigma, labels)


def jvp(T, x, sigma, u, labels=None) -> torch.Tensor:
    """∇_x D(x, σ)·u."""
    return T._by_class(_jvp, x, sigma, labels, u)


def total_derivative(T, x, sigma, labels=None) -> torch.Tensor:
    """dD/dλ along the PF-ODE: ∇D·(D − x) − t·∂_t D, with λ = −ln t."""
    return T._by_class(_total_derivative, x, sigma, labels)


def _jacobian_trace(T, x, sigma):
    flat, t = T._flatten(x, sigma)
    return _trace_terms(T, flat, t, T._posterior(flat, t))


def _jvp(T, x, sigma, u):
    flat, t = T._flatten(x, sigma)
    p = T._posterior(flat, t)
    return _jacobian_vector(T, flat, t, p, u.reshape(flat.shape).to(F64)).reshape(x.shape)


def _total_derivative(T, x, sigma):
    flat, t = T._flatten(x, sigma)
    p = T._posterior(flat, t)
    along = _jacobian_vector(T, flat, t, p, p.D - flat)
    return (along - t[:, None] * _time_partial(T, flat, t, p)).reshape(x.shape)


# isotropic components: per-sample σ, all sums as (B, K) products

def _trace_iso(T, x, t, p):
    v, beta, dist2 = T._iso(x, t)
    e = x - p.D
    cross = (e * x).sum(1, keepdim=True) - e @ T.means.T                        # ⟨x − D, x − μ_k⟩
    spread = (e ** 2).sum(1, keepdim=True) - 2 * beta * cross + beta ** 2 * dist2   # ‖m_k − D‖²
    smooth = (p.r * T.dim * T.c2 / v).sum(1)
    return smooth + (p.r * spread.clamp_min(0)).sum(1) / t ** 2


def _jvp_iso(T, x, t, p, u):
    v, beta, _ = T._iso(x, t)
    e = x - p.D
    proj = (e * u).sum(1, keepdim=True) - beta * ((x * u).sum(1, keepdim=True) - u @ T.means.T)
    w = p.r * proj
    spread = e * w.sum(1, keepdim=True) - x * (w * beta).sum(1, keepdim=True) + (w * beta) @ T.means
    return u * (p.r * T.c2 / v).sum(1, keepdim=True) + spread / t[:, None] ** 2


def _time_partial_iso(T, x, t, p):
    v, beta, dist2 = T._iso(x, t)
    tb = t[:, None]
    a = -T.dim * tb / v + tb * dist2 / v ** 2
    rho = p.r * (a - (p.r * a).sum(1, keepdim=True))
    mix = -x * (rho * beta).sum(1, keepdim=True) + (rho * beta) @ T.means
    rc = p.r * T.c2 / v ** 2
    return mix - 2 * tb * (x * rc.sum(1, keepdim=True) - rc @ T.means)


# general diagonal components: rows grouped by σ, (K, d) variances per group

def _trace_terms(T, x, t, p):
    if T.isotropic:
        return _trace_iso(T, x, t, p)
    out = torch.empty(x.shape[0], dtype=F64)
    for value, rows in T._groups(t):
        xs, r, D = x[rows], p.r[rows], p.D[rows]
        v = T.variances + value ** 2
        beta = value ** 2 / v
        smooth = r @ (T.variances / v).sum(1)
        # ‖m_k − D‖² = ‖x − D‖² − 2⟨x − D, β_k ⊙ (x − μ_k)⟩ + ‖β_k ⊙ (x − μ_k)‖², all as (B, K) products.
        e = xs - D
        cross = (e * xs) @ beta.T - e @ (beta * T.means).T
        sq = (xs ** 2) @ (beta ** 2).T - 2 * xs @ (beta ** 2 * T.means).T + (beta ** 2 * T.means ** 2).sum(1)
        spread = (e ** 2).sum(1, keepdim=True) - 2 * cross + sq
        out[rows] = smooth + (r * spread.clamp_min(0)).sum(1) / value ** 2
    return out


def _jacobian_vector(T, x, t, p, u):
    if T.isotropic:
        return _jvp_iso(T, x, t, p, u)
    out = torch.empty_like(x)
    for value, rows in T._groups(t):
        xs, r, D, us = x[rows], p.r[rows], p.D[rows], u[rows]
        v = T.variances + value ** 2
        beta = value ** 2 / v
        e = xs - D
        smooth = us * (r @ (T.variances / v))
        # ⟨m_k − D, u⟩ = ⟨x − D, u⟩ − ⟨β_k ⊙ (x − μ_k), u⟩
        proj = (e * us).sum(1, keepdim=True) - (xs * us) @ beta.T + us @ (beta * T.means).T
        w = r * proj                                                             # (B, K)
        spread = e * w.sum(1, keepdim=True) - xs * (w @ beta) + w @ (beta * T.means)
        out[rows] = smooth + spread / value ** 2
    return out


def _time_partial(T, x, t, p):
    if T.isotropic:
        return _time_partial_iso(T, x, t, p)
    out = torch.empty_like(x)
    for value, rows in T._groups(t):
        xs, r = x[rows], p.r[rows]
        v = T.variances + value ** 2
        beta = value ** 2 / v
        inv_v2 = 1.0 / v ** 2
        # a_k = −Σ_i t/v_ki + t Σ_i (x_i − μ_ki)²/v_ki²
        quad2 = (xs ** 2) @ inv_v2.T - 2 * xs @ (T.means * inv_v2).T + (T.means ** 2 * inv_v2).sum(1)
        a = -value * (1.0 / v).sum(1) + value * quad2
        rho = r * (a - (r * a).sum(1, keepdim=True))                             # Σ_k ρ_k = 0
        mix = -xs * (rho @ beta) + rho @ (beta * T.means)
        c2v2 = T.variances * inv_v2
        shrink = 2 * value * (xs * (r @ c2v2) - r @ (c2v2 * T.means))
        out[rows] = mix - shrink
    return out


# --- CTM's index laws on an N-level grid, K = the largest number of teacher steps ----------------

def ctm_uniform_index_law(N: int, K: int) -> dict[tuple[int, int, int], Fraction]:
    """Exact law of (i, k, j): i ~ U{0 … N−2}, then k ~ U{1 … min(K, N−1−i)}, then j ~ U{i+k … N−1}."""
    law = {}
    for i in range(N - 1):
        k_max = min(K, N - 1 - i)
        for k in range(1, k_max + 1):
            for j in range(i + k, N):
                law[(i, k, j)] = Fraction(1, N - 1) * Fraction(1, k_max) * Fraction(1, N - i - k)
    return law


def ctm_weighted_index_law(N: int, K: int) -> dict[tuple[int, int, int], Fraction]:
    """Exact law of CTM's weighted draw: k with p(k) ∝ k over 1 … min(K, N−1) (one k per batch, so this is
    also each row's marginal), then i ~ U{0 … N−1−k}, then j ~ U{i+k … N−1}."""
    ks = range(1, min(K, N - 1) + 1)
    total = sum(ks)
    law = {}
    for k in ks:
        for i in range(N - k):
            for j in range(i + k, N):
                law[(i, k, j)] = Fraction(k, total) * Fraction(1, N - k) * Fraction(1, N - i - k)
    return law
