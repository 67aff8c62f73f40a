"""Analytic-Precond's teacher statistics l_λ and s_λ (docs/math.md, "Statistics"): estimate, save, load.

For each of `n_points` noise levels σ_k, uniform in λ = −ln σ, with the same M pairs (x_0, ε) and
Rademacher probes v at every level (common random numbers, so the curves are smooth in λ):

    x      = x_0 + σ_k·ε                                   exact samples of q_σ
    l_k    = (1/(M·d)) Σ_m v_mᵀ ∇_x D(x_m, σ_k) v_m        Hutchinson, one forward-mode JVP per sample
    u      = D − x                                          dx/dλ along the PF-ODE
    dD/dλ  = JVP of (x, λ) ↦ D(x, e^{−λ}) along (u, 1)      total derivative (finite-difference fallback)
    g      = D − l_k·x,   ġ = dD/dλ − l'_k·x − l_k·u        l' by central differences of the l curve
    s_k    = Σ⟨ġ, g⟩ / (Σ‖g‖² + δ),  δ = ridge·Σ‖x‖²        scalar least squares with a ridge

With Rademacher probes ‖v‖² = d exactly, so the identity part c_skip(σ)·I of an EDM denoiser adds no
Hutchinson variance: the "network-part trick" is automatic here (docs/math.md, "Corrections
to the derivation note", item 3).
The ridge defaults to 1e-14, not 1e-8 (same section, item 1): for data smooth at scale σ, ‖g‖² shrinks
like σ⁴ (≈ 1e-11 per dimension at σ = 0.002), and a 1e-8 ridge then drags s from its true −2 to 0.
Sums are accumulated in float64; l is clamped to [0, 1], the range the exact l always lies in.
Because ġ needs l' (known only once the whole l curve is), each level stores the sums
P = Σ⟨dD/dλ − l_k u, g⟩ and Q = Σ⟨x, g⟩, and s_k = (P_k − l'_k Q_k)/(R_k + δ_k) at the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from apctl.errors import ApctlError, first_line
from apctl.files import MiB, check_input_file, write_safetensors
from apctl.schedules import SIGMA_MAX, SIGMA_MIN

FORMAT_VERSION = 1
# Bounds on what a statistics file may hold (a hand-edited or hostile file fails at once):
# the estimate is tabulated on n_points levels (config: a few hundred at most).
MAX_STATISTICS_BYTES = 64 * MiB
MAX_STATISTICS_POINTS = 100_000


@dataclass
class StatisticsSettings:
    """What determines the estimate; a cached file is reused only when all of these match."""

    n_points: int = 120
    n_samples: int = 4096
    batch_size: int = 512
    seed: int = 0
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    derivative: str = "jvp"          # "jvp" or "fd" (finite differences along (u, 1))
    fd_step: float = 1e-3
    ridge: float = 1e-14

    def key(self) -> dict:
        """The settings that change the numbers (batch_size does not)."""
        d = dict(self.__dict__)
        d.pop("batch_size")
        return d


@dataclass
class PrecondStatistics:
    lam: np.ndarray
    l: np.ndarray
    s: np.ndarray
    teacher_fingerprint: str
    settings: dict
    extras: dict = field(default_factory=dict)

    @property
    def sigma(self) -> np.ndarray:
        return np.exp(-self.lam)

    def save(self, path: str | Path) -> None:
        """Write lam, l, s and the metadata `load_statistics` reads to a safetensors file, atomically."""
        write_safetensors(path, {"lam": self.lam, "l": self.l, "s": self.s}, metadata={
            "format": "apctl-precond-statistics", "format_version": str(FORMAT_VERSION),
            "teacher_fingerprint": self.teacher_fingerprint,
            "settings": json.dumps(self.settings, sort_keys=True),
            "extras": json.dumps(self.extras, sort_keys=True),
        })


def load_statistics(path: str | Path) -> PrecondStatistics:
    """Read a statistics file written by `PrecondStatistics.save`; one-line errors otherwise."""
    from safetensors import safe_open

    path = Path(path)
    check_input_file(path, MAX_STATISTICS_BYTES, "statistics file")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise ApctlError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    if meta.get("format") != "apctl-precond-statistics" or not {"lam", "l", "s"} <= arrays.keys():
        raise ApctlError(f"{path} is not an apctl precond statistics file (run `apctl precond compute`)")
    shapes = {arrays[k].shape for k in ("lam", "l", "s")}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or not 2 <= len(arrays["lam"]) <= MAX_STATISTICS_POINTS:
        raise ApctlError(f"{path}: lam, l and s must be vectors of one length in 2…{MAX_STATISTICS_POINTS}, "
                         f"got shapes {', '.join(str(arrays[k].shape) for k in ('lam', 'l', 's'))}")
    decoded = {}
    for key in ("settings", "extras"):
        try:
            decoded[key] = json.loads(meta.get(key, "{}"))
        except (ValueError, RecursionError):
            raise ApctlError(f"{path}: its '{key}' metadata is not valid JSON (run `apctl precond compute`)") from None
        if not isinstance(decoded[key], dict):
            raise ApctlError(f"{path}: its '{key}' metadata is not a JSON object (run `apctl precond compute`)")
    return PrecondStatistics(arrays["lam"].astype(np.float64), arrays["l"].astype(np.float64),
                             arrays["s"].astype(np.float64), str(meta.get("teacher_fingerprint", "")),
                             decoded["settings"], decoded["extras"])


def statistics_match(stats: PrecondStatistics, fingerprint: str, settings: StatisticsSettings) -> bool:
    return stats.teacher_fingerprint == fingerprint and stats.settings == settings.key()


Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products in float64."""
    return (a.double() * b.double()).flatten(1).sum(1)


def _total_derivative(denoise: Denoise, x, lam_k: float, u, labels, settings: StatisticsSettings):
    """dD/dλ at (x, λ_k) along the tangent (u, 1): a JVP, or central differences of step δ."""
    if settings.derivative == "jvp":
        lam = torch.full((x.shape[0],), lam_k, dtype=torch.float64, device=x.device)

        def along(x_, lam_):
            return denoise(x_, torch.exp(-lam_).to(x_.dtype), labels)

        _, dD = torch.func.jvp(along, (x, lam), (u.to(x.dtype), torch.ones_like(lam)))
        return dD
    delta = settings.fd_step
    sig = lambda e: torch.full((x.shape[0],), math.exp(-(lam_k + e)), dtype=x.dtype, device=x.device)  # noqa: E731
    return (denoise(x + delta * u, sig(delta), labels) - denoise(x - delta * u, sig(-delta), labels)) / (2 * delta)


def to_host(sums: torch.Tensor) -> np.ndarray:
    """The one device → host read of an estimate: its per-level float64 sums, at the end."""
    return sums.cpu().numpy()


@torch.no_grad()
def estimate_statistics(denoise: Denoise, x0: torch.Tensor, labels: torch.Tensor | None,
                        settings: StatisticsSettings, fingerprint: str,
                        progress: Callable[[int, int], None] | None = None) -> PrecondStatistics:
    """l_λ and s_λ of a teacher `denoise(x, σ, labels)` on clean samples x0 (M, *shape), as documented above.

    `x0` (and `labels`) are the M data points used at every level; their dtype is the dtype the
    teacher is evaluated in and their device the device it runs on (the teacher's). The noise and
    probes are drawn on the CPU (a CPU generator: the same numbers on every device) and moved there;
    JVPs run there in batches of `batch_size`, and the per-level sums are accumulated there in
    float64 and read once, at the end. `progress(done, total)` is called after each noise level.
    """
    if settings.derivative not in ("jvp", "fd"):
        raise ApctlError(f"precond.derivative must be 'jvp' or 'fd', got {settings.derivative!r}")
    M = x0.shape[0]
    d = x0[0].numel()
    device = x0.device
    gen = torch.Generator().manual_seed(settings.seed)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=x0.dtype)
    probes = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).to(device=device, dtype=x0.dtype)
    labels = None if labels is None else labels.to(device)
    lam = np.linspace(-math.log(settings.sigma_max), -math.log(settings.sigma_min), settings.n_points)
    # Per level: l (clamped Hutchinson mean) and the sums P, Q, R, X of the module docstring.
    sums = torch.zeros(len(lam), 5, dtype=torch.float64, device=device)
    batches = [slice(i, min(i + settings.batch_size, M)) for i in range(0, M, settings.batch_size)]

    for k, lam_k in enumerate(lam):
        sigma = math.exp(-lam_k)
        hutchinson = torch.zeros((), dtype=torch.float64, device=device)
        denoised = []
        for b in batches:
            x = x0[b] + sigma * eps[b]
            sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=device)
            y = None if labels is None else labels[b]
            D, Jv = torch.func.jvp(lambda x_: denoise(x_, sig, y), (x,), (probes[b],))
            hutchinson += _dot(probes[b], Jv).sum()
            denoised.append(D)
        l_k = (hutchinson / (M * d)).clamp(0.0, 1.0)
        sums[k, 0] = l_k
        for b, D in zip(batches, denoised):
            x = x0[b] + sigma * eps[b]
            y = None if labels is None else labels[b]
            u = D - x
            dD = _total_derivative(denoise, x, lam_k, u, y, settings)
            g = D.double() - l_k * x.double()
            a = dD.double() - l_k * u.double()
            sums[k, 1:] += torch.stack([_dot(a, g).sum(), _dot(x, g).sum(), _dot(g, g).sum(), _dot(x, x).sum()])
        if progress is not None:
            progress(k + 1, len(lam))

    l, P, Q, R, X = to_host(sums).T
    l_prime = np.gradient(l, lam, edge_order=2)
    s = (P - l_prime * Q) / (R + settings.ridge * X)
    return PrecondStatistics(lam, l.copy(), s, fingerprint, settings.key(),
                             extras={"l_prime": l_prime.tolist()})
