"""iSD's flow-map student: a velocity network F_θ(x_t, t, s, y) on an interpolant, seen by the rest of
the engine as a two-time denoiser in EDM's σ units.

The interpolants, t ∈ [0, 1] from data to noise (Kim et al. 2026; SNU-VGILab/improvedSelfDistillation,
`methods/isd.py`; docs/reference_code.md, "iSD"):

    linear   x_t = (1 − t)·x_0 + t·z,                 v = z − x_0,                  X_θ(x_t, t, s) = x_t − (t − s)·F_θ
    trig     x_t = cos τ·x_0 + sin τ·z,  τ = c·t,     v = cos τ·z − sin τ·x_0,      X_θ(x_t, t, s) = cos Δ·x_t − sin Δ·F_θ,
                                                                                   Δ = c·(t − s)

with c = TRIG_RATE = 1.57, the reference code's stand-in for π/2; v is dx_t/dt (linear) or dx_t/dτ
(trig), and F_θ(x_t, t, t) learns E[v | x_t]. F_θ is the network's raw output: no c_skip, no c_out.

In EDM's units x̃ = x_t/α(t), σ = β(t)/α(t) (x_t = α·x_0 + β·z: linear α = 1 − t, β = t; trig α = cos τ,
β = sin τ), so t = σ/(1 + σ) (linear) or atan(σ)/c (trig). The map X_θ, divided by α(s), is then
exactly the first-order jump

    G(x̃, σ_t, σ_s) = (σ_s/σ_t)·x̃ + (1 − σ_s/σ_t)·D_θ(x̃, σ_t, σ_s),
    D_θ(x̃, σ_t, σ_s) = a(t)·x_t − b(t)·F_θ(x_t, t, s)        linear a = 1, b = t;  trig a = cos τ, b = sin τ

for every s ≤ t (docs/math.md, "iSD"): `forward` returns that D_θ, so the run samples and probes the
student through CTM's coefficients (precond.kind = "ctm") like any other, and `forward(…, velocity=True)`
is F_θ itself, the function the iSD objective trains.
"""

from __future__ import annotations

import torch

from apctl.networks.mlp import TwoTimeMLP

TRIG_RATE = 1.57   # τ = 1.57·t: the reference code's rounding of π/2, kept for parity


class LinearTransport:
    """x_t = (1 − t)·x_0 + t·z; velocity per unit t."""

    name = "linear"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, β) of x_t = α·x_0 + β·z."""
        return 1 - t, t

    def velocity(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = dx_t/dt = z − x_0 (the conditional velocity)."""
        return z - x0

    def time_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """t with β(t)/α(t) = σ: t = σ/(1 + σ)."""
        return sigma / (1 + sigma)

    def flow_map(self, x: torch.Tensor, F: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """X(x_t, t, s) = x_t − (t − s)·F."""
        return x - (t - s) * F

    def denoised(self, x: torch.Tensor, F: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D = x_t − t·F (the x̂_0 the first-order jump in σ needs)."""
        return x - t * F

    def eulerian_target(self, F, v_hat, x, dF, t, s):
        """T = F + dX/dt along the model's flow = v̂ − (t − s)·dF (F drops out)."""
        return v_hat - (t - s) * dF


class TrigTransport:
    """x_t = cos τ·x_0 + sin τ·z, τ = TRIG_RATE·t; velocity per unit τ."""

    name = "trig"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau = TRIG_RATE * t
        return tau.cos(), tau.sin()

    def velocity(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = dx_t/dτ = cos τ·z − sin τ·x_0."""
        tau = TRIG_RATE * t
        return tau.cos() * z - tau.sin() * x0

    def time_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """t with tan τ = σ: t = atan(σ)/TRIG_RATE."""
        return torch.atan(sigma) / TRIG_RATE

    def flow_map(self, x, F, t, s):
        """X(x_t, t, s) = cos Δ·x_t − sin Δ·F, Δ = TRIG_RATE·(t − s)."""
        delta = TRIG_RATE * (t - s)
        return delta.cos() * x - delta.sin() * F

    def denoised(self, x, F, t):
        """D = cos τ·x_t − sin τ·F."""
        tau = TRIG_RATE * t
        return tau.cos() * x - tau.sin() * F

    def eulerian_target(self, F, v_hat, x, dF, t, s):
        """T = F + dX/dτ along the model's flow = F + cos Δ·(v̂ − F) − sin Δ·(x_t + dF), Δ = TRIG_RATE·(t − s);
        dF must be the derivative per unit τ for this to vanish exactly on the true flow map."""
        delta = TRIG_RATE * (t - s)
        return F + delta.cos() * (v_hat - F) - delta.sin() * (x + dF)


TRANSPORTS = {"linear": LinearTransport(), "trig": TrigTransport()}


class FlowMapMLP(TwoTimeMLP):
    """TwoTimeMLP's network with a raw output: F_θ(x_t, t, s, y) = head(body([g·x_t, emb(t), emb(s), W_y·y]))
    for vectors, the head starting at zero; no c_skip, c_out or c_in.

    emb embeds the raw t ∈ [0, 1] at frequencies spaced geometrically from 10⁻⁴ to 1, as DiT's timestep
    embedding in the reference network (10000^(−k/half)): smooth in t, as the tangent's finite difference
    needs. g is TwoTimeMLP's fixed input gain (networks/mlp.py).
    """

    def __init__(self, shape: tuple[int, ...], label_dim: int = 0, hidden: int = 256, depth: int = 4,
                 embed_dim: int = 64, input_gain: float = 1.0, activation: str = "silu", transport: str = "linear"):
        super().__init__(shape, label_dim, hidden, depth, embed_dim, input_gain=input_gain, activation=activation,
                         time_frequencies=(1e-4, 1.0))
        self.transport = TRANSPORTS[transport]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """F_θ(x_t, t, s, y): x_t [B, *shape], t and s [B] in [0, 1]; labels [B, label_dim] (zeros: no class)."""
        flat = x_t.reshape(x_t.shape[0], -1).float()
        F = self.network(self.input_gain * flat, t.float().reshape(-1), s.float().reshape(-1), labels)
        return F.reshape(x_t.shape).to(x_t.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None,
                velocity: bool = False) -> torch.Tensor:
        """velocity=False: D_θ(x̃, σ_t, σ_s) in EDM's units (module docstring); velocity=True: F_θ(x_t, t, s)."""
        if velocity:
            return self.velocity(x, t, s, labels)
        shape, batch = (-1,) + (1,) * (x.dim() - 1), (x.shape[0],)

        def time_of(sigma):       # per-sample t of σ, converted in float64 (atan of σ up to ~1256), used in x's dtype
            sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1)
            return torch.broadcast_to(self.transport.time_of_sigma(sigma), batch).to(x.dtype)

        t_t, t_s = time_of(t), time_of(s)
        x_t = self.transport.coefficients(t_t.view(shape))[0] * x
        return self.transport.denoised(x_t, self.velocity(x_t, t_t, t_s, labels), t_t.view(shape))
