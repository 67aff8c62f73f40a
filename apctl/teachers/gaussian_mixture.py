"""Exact denoisers of Gaussian mixtures: the embedded default teachers.

Data x_0 ~ Σ_k π_k·N(μ_k, diag(c_k²)) (c_k = 0 allowed: the empirical / Dirac mixture). Noising by
σ = t keeps it a mixture with per-dimension variances v_k = c_k² + t², so with β_k = t²/v_k
(docs/math.md, "Exact teachers"; written here per dimension):

    r_k(x)  ∝ π_k·Π_i v_ki^{−1/2}·exp(−Σ_i (x_i − μ_ki)²/(2 v_ki))          responsibilities
    m_k     = x − β_k ⊙ (x − μ_k)                                            component posterior means
    D(x, t) = Σ_k r_k m_k                                                   the exact denoiser E[x_0 | x_t]

Its exact derivatives (Jacobian trace, JVP, total λ-derivative) are test oracles: tests/oracles.py.

Every sum over components is a (B, K) × (K, d) matrix product, so memory is O(B·K + K·d), never
O(B·K·d): an empirical mixture over a whole data set stays cheap. Computation is in float64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from apctl.draws import as_draws


@dataclass
class _Posterior:
    """Quantities shared by the denoiser and its derivatives at one (x, t)."""

    r: torch.Tensor        # (B, K) responsibilities
    D: torch.Tensor        # (B, d) the denoiser


class GaussianMixtureTeacher:
    """D(x, σ, labels) for a Gaussian mixture, exact; and exact samples of the mixture.

    means: (K, d); stds: (K,) isotropic, (K, d) diagonal, or a scalar; weights: (K,), normalised here;
    classes: optional (K,) integer class of each component, for class-conditional teachers.
    `shape` is the per-sample data shape (e.g. (2,) or (1, 8, 8)); inputs are flattened to d = prod(shape).
    """

    dtype = torch.float64
    exact = True
    network = None

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
        # Host copies for `sample`, whose draws are made on the CPU (CPU generators) wherever the teacher lives.
        self._host_log_weights = self.log_weights
        self._host_classes = self.classes
        self._host_components = (self.means, self.variances)
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
    @property
    def source(self) -> str:
        """The mixture's name ('gmm', 'empirical-<data set>'): what a report calls this teacher."""
        return self.name

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(x, sigma, labels)

    def denoise(self, x, sigma, labels=None):
        return self._by_class(GaussianMixtureTeacher._denoise, x, sigma, labels)

    def fingerprint(self) -> str:
        """A hash of the mixture, computed once (before any move: no device read afterwards)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.sha256()
        for tensor in (self.means, self.variances, self.log_weights):
            h.update(tensor.cpu().numpy().tobytes())
        if self.classes is not None:
            h.update(self.classes.cpu().numpy().tobytes())
        h.update(repr(self.shape).encode())
        return "gmm-" + h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> "GaussianMixtureTeacher":
        """Move every tensor (and the per-class sub-mixtures) to `device`; returns self."""
        self.fingerprint()
        for name in ("means", "variances", "c2", "_sq_means", "log_weights", "classes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        for sub in self._per_class.values():
            sub.to(device)
        return self

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

    def _by_class(self, fn, x, sigma, labels, *extra):
        """fn(teacher, x, σ, *extra), unconditional, on all components or, per class, on that class's components.

        Conditioning on y restricts the mixture to the components of class y (weights renormalised),
        so grouping the batch by class costs K/C per sample instead of K.
        """
        if labels is None or self.classes is None:
            return fn(self, x, sigma, *extra)
        classes = self.class_indices(labels)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        outputs, order = [], []
        for c in torch.unique(classes).tolist():
            rows = (classes == c).nonzero().squeeze(1)
            sub = self._class_teacher(c)
            outputs.append(fn(sub, x[rows], sigma[rows], *(e[rows] for e in extra)))
            order.append(rows)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(outputs)[inverse]

    # --- unconditional implementations --------------------------------------------------------------
    def _denoise(self, x, sigma):
        flat, t = self._flatten(x, sigma)
        return self._posterior(flat, t).D.reshape(x.shape).to(x.dtype)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, variances), (K, d) each: the CPU copies made at construction (no device value read)."""
        return self._host_components

    def sample(self, n: int, generator=None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact samples x_0, shape (n, *shape), on the teacher's device; with integer `labels` (n,),
        drawn from those classes.

        The draws come from `generator` (a CPU torch.Generator, or the per-sample draws of a training
        step, apctl/draws.py) on the CPU, from the host copies of the weights and classes, and only
        then move to the device: no device value is read on the host.
        """
        draws = as_draws(generator, n)
        logits = self._host_log_weights.expand(n, -1).clone()
        if labels is not None:
            member = self.class_indices(labels.cpu())[:, None] == self._host_classes[None, :]
            logits = logits.masked_fill(~member, -math.inf)
        k = draws.categorical(logits.softmax(dim=1)).to(self.device)
        noise = draws.randn((self.dim,), dtype=torch.float64).to(self.device)
        return (self.means[k] + self.variances[k].sqrt() * noise).reshape(n, *self.shape)

    # --- internals --------------------------------------------------------------------------------
    def _flatten(self, x, sigma):
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        t = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
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

    # --- general diagonal components: rows grouped by σ, (K, d) variances per group -----------------
    def _posterior(self, x, t) -> _Posterior:
        if self.isotropic:
            return self._posterior_iso(x, t)
        r = torch.empty(x.shape[0], self.means.shape[0], dtype=torch.float64, device=x.device)
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
