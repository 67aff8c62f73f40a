"""Evaluation images the way EDM's `generate.py` makes them: image i comes from seed i.

Seed i owns one CPU generator, `torch.Generator().manual_seed(i)`, which draws, in this order, the
image's unit noise z_i (C, H, W), its class (one `randint(label_dim)`, class-conditional networks
only) and every later draw for that image (CTM γ re-noising, one (C, H, W) normal per step). An
image therefore depends on its seed alone: not on the batch it is generated in, nor on how many
processes share the work. (EDM's `StackedRandomGenerator` draws in the same order, on its device.)

Two makers of images, each `maker(seeds) → (B, C, H, W)` float32 in [−1, 1] on the CPU, with
`protocol()` the plain-data description that a reported number carries:

* `StudentImages`: CTM γ-sampling of a student along a σ list (NFE = len(σ) − 1).
* `TeacherEDMImages`: EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 without churn):
  N Karras levels σ_0 = σ_max > … > σ_{N−1} = σ_min, then 0; N − 1 Heun steps and a last Euler step
  to σ = 0, so 2N − 1 network evaluations (35 for N = 18, 79 for 40, 511 for 256). The ODE state is
  float64, as in EDM (the network itself runs in its own precision).
"""

from __future__ import annotations

from typing import Sequence

import torch

from apctl.sampling import heun_solve, student_sample
from apctl.schedules import karras_sigmas


class SeedGenerators:
    """One CPU generator per seed; draws are stacked along the batch axis (EDM's StackedRandomGenerator)."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, size: Sequence[int]) -> torch.Tensor:
        """(B, *rest) standard normals, row b from seed b's generator."""
        size = tuple(size)
        if size[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} seeds cannot draw a batch of {size[0]}")
        return torch.stack([torch.randn(size[1:], generator=g) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """(B,) integers in [0, high), one per seed."""
        return torch.stack([torch.randint(high, (), generator=g) for g in self.generators])


def seeded_inputs(seeds: Sequence[int], shape: Sequence[int], label_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None, SeedGenerators]:
    """Unit noise (B, *shape) and one-hot classes (None when unconditional) of `seeds`, and their
    generators positioned for the images' later draws."""
    gens = SeedGenerators(seeds)
    z = gens.randn((len(gens.generators), *shape))
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(gens.randint(label_dim), label_dim).float()
    return z, labels, gens


def edm_sampler_sigmas(steps: int) -> list[float]:
    """EDM's time steps: `steps` Karras levels (ρ = 7, 80 → 0.002) followed by 0."""
    return karras_sigmas(steps).tolist() + [0.0]


def edm_sampler_nfe(steps: int) -> int:
    """Network evaluations of EDM's deterministic sampler: (steps − 1) Heun steps with 2, the last Euler with 1."""
    return 2 * steps - 1


@torch.no_grad()
def edm_sample(denoise, z: torch.Tensor, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's deterministic sampler from unit noise z: x ← σ_0·z in float64, Heun steps between the
    Karras levels, an Euler step to σ = 0 (`apctl.sampling.heun_solve`); the result in float64."""
    sigmas = edm_sampler_sigmas(steps)
    return heun_solve(denoise, z.to(torch.float64) * sigmas[0], sigmas, labels)


class StudentImages:
    """A student's images by CTM γ-sampling along `sigmas`, on the network's device."""

    def __init__(self, net, precond, sigmas: Sequence[float], gamma: float, shape, label_dim: int,
                 weights: str = "ema"):
        self.net, self.precond = net, precond
        self.sigmas, self.gamma = [float(s) for s in sigmas], float(gamma)
        self.shape, self.label_dim, self.weights = tuple(shape), int(label_dim), weights
        self.device = next(net.parameters()).device

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        z, labels, gens = seeded_inputs(seeds, self.shape, self.label_dim)
        x = student_sample(self.net, self.precond, z.to(self.device), self.sigmas,
                           None if labels is None else labels.to(self.device), gamma=self.gamma, noise=gens.randn)
        return x.float().clamp(-1, 1).cpu()

    def protocol(self) -> dict:
        return {"sampler": "student CTM γ-sampling", "nfe": self.nfe, "sigmas": self.sigmas, "gamma": self.gamma,
                "weights": self.weights}


class TeacherEDMImages:
    """A teacher's images by EDM's deterministic sampler with `steps` levels (see the module docstring)."""

    def __init__(self, teacher, steps: int, shape, label_dim: int):
        if steps < 2:
            raise ValueError(f"EDM's sampler needs at least 2 levels, got {steps}")
        self.teacher, self.steps = teacher, int(steps)
        self.shape, self.label_dim = tuple(shape), int(label_dim)

    @property
    def nfe(self) -> int:
        return edm_sampler_nfe(self.steps)

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        z, labels, _ = seeded_inputs(seeds, self.shape, self.label_dim)
        device = self.teacher.device
        x = edm_sample(self.teacher, z.to(device), self.steps, None if labels is None else labels.to(device))
        return x.float().clamp(-1, 1).cpu()

    def protocol(self) -> dict:
        return {"sampler": f"EDM deterministic sampler ({self.steps - 1} Heun steps + Euler to σ = 0)",
                "nfe": self.nfe, "steps": self.steps, "sigmas": edm_sampler_sigmas(self.steps), "gamma": 0.0,
                "weights": "teacher"}
