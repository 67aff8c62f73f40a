"""The outer coefficients f(t, s), g(t, s) of the two-time student, G(x, t, s) = f·x + g·D_θ(x, t, s).

Three preconditionings share one interface, `coefficients(t, s) -> (f, g)`:

* CTM (Kim et al. 2024): the DDIM / Euler jump with D frozen, f = s/t, g = 1 − s/t.
* CM (Song et al. 2023) written on the EDM denoiser, with the boundary placed at the landing time s
  (docs/math.md, "Preconditionings"; CM proper is the slice s = ε):
  f = σ_d²/((t − s)² + σ_d²) − (1 − s/t)·c_skip(t),  g = 1 − s/t.
* Analytic-Precond (Zheng et al. 2025), from the teacher statistics l_λ and s_λ (paper eqs. 12–14; docs/math.md, "Preconditionings"):

      A(t, s) = (s/t)·exp(∫_{λ_t}^{λ_s} l dλ)
      backward: B = ∫_{λ_t}^{λ_s} exp(−(λ_s − λ) + ∫_λ^{λ_s} (l − s) dr) dλ,
                f = A/(1 + l_s·B),  g = B/(1 + l_s·B)
      forward:  B = ∫_{λ_t}^{λ_s} exp(−(λ_s − λ) + ∫_λ^{λ_s} l dr + ∫_{λ_t}^{λ} s dr) dλ,
                f = A − l_t·B,  g = B

  Both give f(t, t) = 1, g(t, t) = 0, and exactly CTM's coefficients when l ≡ s ≡ 0.

Coefficients are computed in float64 on the CPU (the exponents reach tens; never in float32) and
cast by the caller to its dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np
import torch
from scipy.interpolate import CubicSpline, make_interp_spline

from apctl.errors import ApctlError
from apctl.schedules import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, c_skip


class Preconditioning(Protocol):
    """The contract every preconditioning keeps. `state_dict()` holds all it needs beyond its config
    (saved in checkpoints under `precond.`); `needs_statistics` says whether building one takes
    teacher statistics."""

    name: str
    needs_statistics: bool

    def coefficients(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, g) per element of the broadcast t, s (σ units, t ≥ s), float64."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...


def _as_float64(t, s) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(t, dtype=torch.float64, device="cpu")
    s = torch.as_tensor(s, dtype=torch.float64, device="cpu")
    return torch.broadcast_tensors(t, s)


class CTMPrecond:
    """CTM's Euler preconditioning: f = s/t, g = 1 − s/t."""

    name = "ctm"
    needs_statistics = False

    def coefficients(self, t, s):
        t, s = _as_float64(t, s)
        return s / t, 1.0 - s / t

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class CMPrecond:
    """CM's c_skip/c_out preconditioning on the EDM denoiser, boundary at the landing time s."""

    name = "cm"
    needs_statistics = False

    def __init__(self, sigma_data: float = SIGMA_DATA):
        self.sigma_data = sigma_data

    def coefficients(self, t, s):
        t, s = _as_float64(t, s)
        g = 1.0 - s / t
        skip_cm = self.sigma_data ** 2 / ((t - s) ** 2 + self.sigma_data ** 2)
        return skip_cm - g * c_skip(t, self.sigma_data), g

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class AnalyticPrecond:
    """Analytic-Precond from tabulated teacher statistics (λ_k, l_k, s_k).

    The statistics are interpolated by a natural cubic spline in λ (docs/math.md, "Preconditionings"; linear is
    offered for comparison), and the cumulative integrals L = ∫l, S = ∫s are the spline's exact
    antiderivatives. The remaining integral B is composite Simpson on [λ_t, λ_s] with step ≤ `step`,
    its exponent max-shifted. Results are cached per (t, s) pair, so a training run on a fixed
    grid evaluates each pair once.
    """

    name = "analytic"
    needs_statistics = True

    def __init__(self, lam: np.ndarray, l: np.ndarray, s: np.ndarray, form: str = "backward",
                 interpolation: str = "cubic", step: float = 1e-3):
        if form not in ("backward", "forward"):
            raise ApctlError(f"Analytic-Precond form must be 'backward' or 'forward', got {form!r}")
        lam, l, s = (np.asarray(a, dtype=np.float64) for a in (lam, l, s))
        if lam.ndim != 1 or lam.shape != l.shape or lam.shape != s.shape or len(lam) < 4:
            raise ApctlError("Analytic-Precond statistics need 1-D λ, l, s arrays of one length ≥ 4")
        if not np.all(np.diff(lam) > 0):
            raise ApctlError("Analytic-Precond statistics need a strictly increasing λ grid")
        if not (np.isfinite(l).all() and np.isfinite(s).all()):
            raise ApctlError("Analytic-Precond statistics contain non-finite values")
        self.lam, self.l, self.s = lam, l, s
        self.form = form
        self.step = step
        if interpolation == "cubic":
            self._l = CubicSpline(lam, l, bc_type="natural")
            self._s = CubicSpline(lam, s, bc_type="natural")
        elif interpolation == "linear":
            self._l = make_interp_spline(lam, l, k=1)
            self._s = make_interp_spline(lam, s, k=1)
        else:
            raise ApctlError(f"interpolation must be 'cubic' or 'linear', got {interpolation!r}")
        self._L = self._l.antiderivative()
        self._S = self._s.antiderivative()
        self._cache: dict[tuple[float, float], tuple[float, float]] = {}

    @classmethod
    def from_functions(cls, l_fn: Callable[[np.ndarray], np.ndarray], s_fn: Callable[[np.ndarray], np.ndarray],
                       sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, points: int = 20001,
                       **kwargs) -> "AnalyticPrecond":
        """From exact statistics l(λ), s(λ), sampled on a fine uniform λ grid (tests and oracles)."""
        lam = np.linspace(-math.log(sigma_max), -math.log(sigma_min), points)
        return cls(lam, l_fn(lam), s_fn(lam), **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tabulated statistics (λ_k, l_k, s_k), float64: with form and interpolation (config)
        they rebuild this preconditioning exactly."""
        return {name: torch.from_numpy(getattr(self, name).copy()) for name in ("lam", "l", "s")}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], **kwargs) -> "AnalyticPrecond":
        missing = {"lam", "l", "s"} - state.keys()
        if missing:
            raise ApctlError(f"Analytic-Precond state lacks {', '.join(sorted(missing))}")
        return cls(*(state[k].double().numpy() for k in ("lam", "l", "s")), **kwargs)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return math.exp(-self.lam[-1]), math.exp(-self.lam[0])

    def l_at(self, lam: np.ndarray | float) -> np.ndarray:
        return self._l(lam)

    def s_at(self, lam: np.ndarray | float) -> np.ndarray:
        return self._s(lam)

    def coefficients(self, t, s):
        t, s = _as_float64(t, s)
        pairs = torch.stack([t.reshape(-1), s.reshape(-1)], dim=1)
        unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        values = torch.tensor([self.pair(float(a), float(b)) for a, b in unique.tolist()], dtype=torch.float64)
        fg = values[inverse]
        return fg[:, 0].reshape(t.shape), fg[:, 1].reshape(t.shape)

    def pair(self, t: float, s: float) -> tuple[float, float]:
        """(f, g) for one jump t → s, t ≥ s > 0."""
        key = (t, s)
        if key not in self._cache:
            self._cache[key] = self._compute(t, s)
        return self._cache[key]

    def table(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """f[i, j], g[i, j] for every pair t = sigmas[i] ≥ s = sigmas[j] (upper triangle; NaN below)."""
        n = len(sigmas)
        f = np.full((n, n), np.nan)
        g = np.full((n, n), np.nan)
        for i in range(n):
            for j in range(i, n):
                f[i, j], g[i, j] = self.pair(float(sigmas[i]), float(sigmas[j]))
        return f, g

    def _compute(self, t: float, s: float) -> tuple[float, float]:
        if not (t >= s > 0):
            raise ApctlError(f"a jump needs t ≥ s > 0, got t={t}, s={s}")
        lo, hi = self.sigma_range
        tol = 1e-9
        if s < lo * (1 - tol) or t > hi * (1 + tol):
            raise ApctlError(f"jump {t:g} → {s:g} leaves the statistics' σ range [{lo:g}, {hi:g}]")
        lam_t, lam_s = -math.log(t), -math.log(s)
        h = lam_s - lam_t
        if h < 1e-6:
            return 1.0 - h, h
        n = max(2, 2 * math.ceil(h / (2 * self.step)))
        lam = np.linspace(lam_t, lam_s, n + 1)
        L_s, S_anchor = float(self._L(lam_s)), float(self._S(lam_s if self.form == "backward" else lam_t))
        exponent = -(lam_s - lam) + (L_s - self._L(lam)) + (self._S(lam) - S_anchor)
        peak = exponent.max()
        weights = np.ones(n + 1)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        log_B = float(peak) + math.log(float(weights @ np.exp(exponent - peak)) * (h / n) / 3.0)
        log_A = -h + L_s - float(self._L(lam_t))
        if self.form == "backward":
            # f = A/(1 + l_s·B), g = B/(1 + l_s·B) in log space: B can exceed float range when the
            # statistics are extreme (e.g. an untrained teacher), while f and g stay bounded.
            l_s = float(self._l(lam_s))
            log_den = float(np.logaddexp(0.0, math.log(l_s) + log_B)) if l_s > 0 else 0.0
            f, g = math.exp(log_A - log_den), _exp_or_raise(log_B - log_den, t, s)
            return f, g
        B = _exp_or_raise(log_B, t, s)
        return math.exp(log_A) - float(self._l(lam_t)) * B, B


def _exp_or_raise(value: float, t: float, s: float) -> float:
    if value > 700:
        raise ApctlError(f"Analytic-Precond coefficient g({t:g}, {s:g}) overflows (ln g = {value:.0f}): the teacher "
                         "statistics are extreme (is the teacher trained?); use precond.form = 'backward' or "
                         "precond.kind = 'ctm'")
    return math.exp(value)
