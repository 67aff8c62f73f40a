"""Exact denoisers of Gaussian mixtures: the embedded default teachers and the test oracles.

Data x_0 ~ Σ_k π_k·N(μ_k, diag(c_k²)) (c_k = 0 allowed: the empirical / Dirac mixture). Noising by
σ = t keeps it a mixture with per-dimension variances v_k = c_k² + t², so with β_k = t²/v_k
(docs/math.md, "Exact teachers", written per dimension):

    r_k(x)  ∝ π_k·Π_i v_ki^{−1/2}·exp(−Σ_i (x_i − μ_ki)²/(2 v_ki))          responsibilities
    m_k     = x − β_k ⊙ (x − μ_k)                                            component posterior means
    D(x, t) = Σ_k r_k m_k                                                   the exact denoiser E[x_0 | x_t]
    ∇D·u    = Σ_k r_k (c_k²/v_k) ⊙ u + Σ_k r_k (m_k − D)⟨m_k − D, u⟩ / t²
    tr ∇D   = Σ_k r_k Σ_i c_ki²/v_ki + Σ_k r_k ‖m_k − D‖² / t²               (variance form: no cancellation)
    ∂_t D   = Σ_k r_k (a_k − ā) m_k − Σ_k r_k (2t c_k²/v_k²) ⊙ (x − μ_k),
              a_k = ∂_t log r_k-part = −Σ_i t/v_ki + t Σ_i (x_i − μ_ki)²/v_ki²,  ā = Σ_k r_k a_k
    dD/dλ   = ∇D·(D − x) − t ∂_t D        (total derivative along the PF-ODE, λ = −ln t)

Every sum over components is a (B, K) × (K, d) matrix product, so memory is O(B·K + K·d), never
O(B·K·d): an empirical mixture over a whole data set stays cheap. Computation is in float64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Posterior:
    """Quantities shared by the denoiser and its derivatives at one (x, t)."""

    r: torch.Tensor        # (B, K) responsibilities
    D: torch.Tensor        # (B, d) the denoiser


class GaussianMixtureTeacher:
    """D(x, σ, labels) for a Gaussian mixture, exact, with its Jacobian trace and total λ-derivative.

    means: (K, d); stds: (K,) isotropic, (K, d) diagonal, or a scalar; weights: (K,), normalised here;
    classes: optional (K,) integer class of each component, for class-conditional teachers.
    `shape` is the per-sample data shape (e.g. (2,) or (1, 8, 8)); inputs are flattened to d = prod(shape).
    """

    dtype = torch.float64

    def __init__(self, means, stds, weights=None, classes=None, shape=None, name: str = "gmm"):
        means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        K, d = means.shape
        stds = torch.as_tensor(np.asarray(stds, dtype=np.float64), dtype=torch.float64)
        stds = stds.reshape(K, 1).expand(K, d) if stds.dim() == 1 else stds.expand(K, d)
        if (stds < 0).any():
            raise ValueError("component stds must be >= 0")
        weights = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        self.means = means
        self.variances = stds.contiguous() ** 2
        # Isotropic components (one variance per component) allow a different σ per sample at (B, K) cost.
        self.isotropic = bool((self.variances == self.variances[:, :1]).all())
        self.c2 = self.variances[:, 0].contiguous()
        self._sq_means = (self.means ** 2).sum(1)
        self.log_weights = (weights / weights.sum()).log()
        self.classes = None if classes is None else torch.as_tensor(np.asarray(classes), dtype=torch.long)
        self.label_dim = 0 if self.classes is None else int(self.classes.max()) + 1
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold d = {d} values")
        self.dim = d
        self.name = name
        # Built here, not lazily: construction converts through numpy, which a torch.func transform forbids.
        self._per_class: dict[int, GaussianMixtureTeacher] = {}
        if self.classes is not None:
            for c in torch.unique(self.classes).tolist():
                mask = self.classes == c
                self._per_class[c] = GaussianMixtureTeacher(self.means[mask], self.variances[mask].sqrt(),
                                                            self.log_weights[mask].exp(), shape=self.shape)

    # --- interface shared with network teachers -------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(x, sigma, labels)

    def denoise(self, x, sigma, labels=None):
        return self._by_class("_denoise", x, sigma, labels)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for tensor in (self.means, self.variances, self.log_weights):
            h.update(tensor.numpy().tobytes())
        if self.classes is not None:
            h.update(self.classes.numpy().tobytes())
        h.update(repr(self.shape).encode())
        return "gmm-" + h.hexdigest()[:16]

    # --- exact derivatives ------------------------------------------------------------------------
    def jacobian_trace(self, x, sigma, labels=None) -> torch.Tensor:
        """tr ∇_x D(x, σ), per sample, in the variance form (docs/math.md, "Exact teachers")."""
        return self._by_class("_jacobian_trace", x, sigma, labels)

    def jvp(self, x, sigma, u, labels=None) -> torch.Tensor:
        """∇_x D(x, σ)·u."""
        return self._by_class("_jvp", x, sigma, labels, u)

    def total_derivative(self, x, sigma, labels=None) -> torch.Tensor:
        """dD/dλ along the PF-ODE: ∇D·(D − x) − t·∂_t D, with λ = −ln t."""
        return self._by_class("_total_derivative", x, sigma, labels)

    # --- class conditioning: each sample sees only its class's components --------------------------
    def class_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """Class index per sample from one-hot rows (B, C) or integer labels (B,); anything else is refused."""
        if labels.dim() == 1 and not labels.is_floating_point():
            classes = labels.long()
        elif labels.dim() == 2 and labels.shape[1] == self.label_dim:
            classes = labels.argmax(dim=1)
            if not torch.equal(labels.double(), torch.nn.functional.one_hot(classes, self.label_dim).double()):
                raise ValueError("labels must be one-hot rows")
        else:
            raise ValueError(f"labels must be one-hot (B, {self.label_dim}) or integer (B,), got shape {tuple(labels.shape)}")
        if len(classes) and (classes.min() < 0 or classes.max() >= self.label_dim):
            raise ValueError(f"class labels must lie in 0 … {self.label_dim - 1}")
        return classes

    def _class_teacher(self, c: int) -> "GaussianMixtureTeacher":
        if c not in self._per_class:
            raise ValueError(f"no mixture component has class {c}")
        return self._per_class[c]

    def _by_class(self, method: str, x, sigma, labels, *extra):
        """Apply an unconditional method, to all components or, per class, to that class's components.

        Conditioning on y restricts the mixture to the components of class y (weights renormalised),
        so grouping the batch by class costs K/C per sample instead of K.
        """
        if labels is None or self.classes is None:
            return getattr(self, method)(x, sigma, *extra)
        classes = self.class_indices(labels)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        outputs, order = [], []
        for c in torch.unique(classes).tolist():
            rows = (classes == c).nonzero().squeeze(1)
            sub = self._class_teacher(c)
            outputs.append(getattr(sub, method)(x[rows], sigma[rows], *(e[rows] for e in extra)))
            order.append(rows)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(outputs)[inverse]

    # --- unconditional implementations --------------------------------------------------------------
    def _denoise(self, x, sigma):
        flat, t = self._flatten(x, sigma)
        return self._posterior(flat, t).D.reshape(x.shape).to(x.dtype)

    def _jacobian_trace(self, x, sigma):
        flat, t = self._flatten(x, sigma)
        return self._trace_terms(flat, t, self._posterior(flat, t))

    def _jvp(self, x, sigma, u):
        flat, t = self._flatten(x, sigma)
        p = self._posterior(flat, t)
        return self._jacobian_vector(flat, t, p, u.reshape(flat.shape).to(torch.float64)).reshape(x.shape)

    def _total_derivative(self, x, sigma):
        flat, t = self._flatten(x, sigma)
        p = self._posterior(flat, t)
        along = self._jacobian_vector(flat, t, p, p.D - flat)
        return (along - t[:, None] * self._time_partial(flat, t, p)).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact samples x_0, shape (n, *shape); with integer `labels` (n,), drawn from those classes."""
        logits = self.log_weights.expand(n, -1).clone()
        if labels is not None:
            member = self.class_indices(labels)[:, None] == self.classes[None, :]
            logits = logits.masked_fill(~member, -math.inf)
        k = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.variances[k].sqrt() * noise).reshape(n, *self.shape)

    # --- internals --------------------------------------------------------------------------------
    def _flatten(self, x, sigma):
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        t = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return flat, t

    def _groups(self, t):
        """Rows sharing one σ: the per-component variances v_k = c_k² + σ² are then one (K, d) matrix."""
        if bool((t == t[0]).all()):
            yield t[0], slice(None)
            return
        for value in torch.unique(t):
            yield value, (t == value).nonzero().squeeze(1)

    # --- isotropic components: per-sample σ, all sums as (B, K) products ----------------------------
    def _iso(self, x, t):
        """v = c_k² + t_b², β = t_b²/v and ‖x_b − μ_k‖², each (B, K)."""
        v = self.c2[None] + t[:, None] ** 2
        dist2 = ((x ** 2).sum(1, keepdim=True) - 2 * x @ self.means.T + self._sq_means).clamp_min(0)
        return v, t[:, None] ** 2 / v, dist2

    def _posterior_iso(self, x, t) -> _Posterior:
        v, beta, dist2 = self._iso(x, t)
        log_r = self.log_weights - 0.5 * self.dim * v.log() - 0.5 * dist2 / v
        r = torch.softmax(log_r, dim=1)
        rb = r * beta
        return _Posterior(r, x - x * rb.sum(1, keepdim=True) + rb @ self.means)

    def _trace_iso(self, x, t, p):
        v, beta, dist2 = self._iso(x, t)
        e = x - p.D
        cross = (e * x).sum(1, keepdim=True) - e @ self.means.T                    # ⟨x − D, x − μ_k⟩
        spread = (e ** 2).sum(1, keepdim=True) - 2 * beta * cross + beta ** 2 * dist2   # ‖m_k − D‖²
        smooth = (p.r * self.dim * self.c2 / v).sum(1)
        return smooth + (p.r * spread.clamp_min(0)).sum(1) / t ** 2

    def _jvp_iso(self, x, t, p, u):
        v, beta, _ = self._iso(x, t)
        e = x - p.D
        proj = (e * u).sum(1, keepdim=True) - beta * ((x * u).sum(1, keepdim=True) - u @ self.means.T)
        w = p.r * proj
        spread = e * w.sum(1, keepdim=True) - x * (w * beta).sum(1, keepdim=True) + (w * beta) @ self.means
        return u * (p.r * self.c2 / v).sum(1, keepdim=True) + spread / t[:, None] ** 2

    def _time_partial_iso(self, x, t, p):
        v, beta, dist2 = self._iso(x, t)
        tb = t[:, None]
        a = -self.dim * tb / v + tb * dist2 / v ** 2
        rho = p.r * (a - (p.r * a).sum(1, keepdim=True))
        mix = -x * (rho * beta).sum(1, keepdim=True) + (rho * beta) @ self.means
        rc = p.r * self.c2 / v ** 2
        return mix - 2 * tb * (x * rc.sum(1, keepdim=True) - rc @ self.means)

    # --- general diagonal components: rows grouped by σ, (K, d) variances per group -----------------
    def _posterior(self, x, t) -> _Posterior:
        if self.isotropic:
            return self._posterior_iso(x, t)
        r = torch.empty(x.shape[0], self.means.shape[0], dtype=torch.float64)
        D = torch.empty_like(x)
        for value, rows in self._groups(t):
            xs = x[rows]
            v = self.variances + value ** 2                                      # (K, d)
            inv_v = 1.0 / v
            quad = (xs ** 2) @ inv_v.T - 2.0 * xs @ (self.means * inv_v).T + (self.means ** 2 * inv_v).sum(1)
            log_r = self.log_weights - 0.5 * v.log().sum(1) - 0.5 * quad         # (B, K)
            r[rows] = torch.softmax(log_r, dim=1)
            beta = value ** 2 * inv_v
            D[rows] = xs - xs * (r[rows] @ beta) + r[rows] @ (beta * self.means)
        return _Posterior(r, D)

    def _trace_terms(self, x, t, p):
        if self.isotropic:
            return self._trace_iso(x, t, p)
        out = torch.empty(x.shape[0], dtype=torch.float64)
        for value, rows in self._groups(t):
            xs, r, D = x[rows], p.r[rows], p.D[rows]
            v = self.variances + value ** 2
            beta = value ** 2 / v
            smooth = r @ (self.variances / v).sum(1)
            # ‖m_k − D‖² = ‖x − D‖² − 2⟨x − D, β_k ⊙ (x − μ_k)⟩ + ‖β_k ⊙ (x − μ_k)‖², all as (B, K) products.
            e = xs - D
            cross = (e * xs) @ beta.T - e @ (beta * self.means).T
            sq = (xs ** 2) @ (beta ** 2).T - 2 * xs @ (beta ** 2 * self.means).T + (beta ** 2 * self.means ** 2).sum(1)
            spread = (e ** 2).sum(1, keepdim=True) - 2 * cross + sq
            out[rows] = smooth + (r * spread.clamp_min(0)).sum(1) / value ** 2
        return out

    def _jacobian_vector(self, x, t, p, u):
        if self.isotropic:
            return self._jvp_iso(x, t, p, u)
        out = torch.empty_like(x)
        for value, rows in self._groups(t):
            xs, r, D, us = x[rows], p.r[rows], p.D[rows], u[rows]
            v = self.variances + value ** 2
            beta = value ** 2 / v
            e = xs - D
            smooth = us * (r @ (self.variances / v))
            # ⟨m_k − D, u⟩ = ⟨x − D, u⟩ − ⟨β_k ⊙ (x − μ_k), u⟩
            proj = (e * us).sum(1, keepdim=True) - (xs * us) @ beta.T + us @ (beta * self.means).T
            w = r * proj                                                         # (B, K)
            spread = e * w.sum(1, keepdim=True) - xs * (w @ beta) + w @ (beta * self.means)
            out[rows] = smooth + spread / value ** 2
        return out

    def _time_partial(self, x, t, p):
        if self.isotropic:
            return self._time_partial_iso(x, t, p)
        out = torch.empty_like(x)
        for value, rows in self._groups(t):
            xs, r = x[rows], p.r[rows]
            v = self.variances + value ** 2
            beta = value ** 2 / v
            inv_v2 = 1.0 / v ** 2
            # a_k = −Σ_i t/v_ki + t Σ_i (x_i − μ_ki)²/v_ki²
            quad2 = (xs ** 2) @ inv_v2.T - 2 * xs @ (self.means * inv_v2).T + (self.means ** 2 * inv_v2).sum(1)
            a = -value * (1.0 / v).sum(1) + value * quad2
            rho = r * (a - (r * a).sum(1, keepdim=True))                         # Σ_k ρ_k = 0
            mix = -xs * (rho @ beta) + rho @ (beta * self.means)
            c2v2 = self.variances * inv_v2
            shrink = 2 * value * (xs * (r @ c2v2) - r @ (c2v2 * self.means))
            out[rows] = mix - shrink
        return out
