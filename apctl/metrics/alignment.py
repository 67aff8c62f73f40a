"""How closely a student follows its teacher's ODE, and how far its samples are from the teacher's.

Trajectory alignment for the same noise z:   RMS = √( mean_{b,i} (student_NFE(z)_bi − Φ_teacher(z)_bi)² )
with Φ_teacher the teacher's PF-ODE solved accurately (many Heun steps), both landing at σ_min.

Sliced Wasserstein-2 between equally many samples a, b of dimension d:
    SW₂(a, b) = √( mean_k W₂²(⟨a, θ_k⟩, ⟨b, θ_k⟩) ),   θ_k uniform on the unit sphere,
where the 1-D W₂² of two equal-size samples is the mean squared difference of their sorted values.

For exact (Gaussian-mixture) teachers whose components all have a positive std, the probe also
counts samples beyond 3σ of the nearest mode (`mode_outliers.py`): the student's, the teacher ODE's
and, as the scale, exact samples' (drawn from the probe's seed, as many as the probe holds).
"""

from __future__ import annotations

import functools

import torch

from apctl.metrics.mode_outliers import fraction_beyond
from apctl.sampling import teacher_sample

N_SIGMA = 3.0


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sliced Wasserstein needs equal sample sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, _ = (a @ theta).sort(dim=0)
    pb, _ = (b @ theta).sort(dim=0)
    return float((pa - pb).pow(2).mean().sqrt())


class AlignmentProbe:
    """Fixed noise z (and labels), the teacher's accurate ODE solution for it, and the metrics of a student.

    The teacher's solution is computed once, so a probe can be evaluated cheaply during training.
    z and the labels are drawn on the CPU (a CPU generator: the same probe on every device) and kept
    there; the reference is solved on the teacher's device and kept as a CPU copy for the metrics.
    """

    def __init__(self, teacher, shape, n: int, seed: int, teacher_steps: int, label_dim: int = 0, progress=None):
        gen = torch.Generator().manual_seed(seed)
        self.z = torch.randn((n, *shape), generator=gen)
        self.labels = None
        if label_dim:
            classes = torch.randint(0, label_dim, (n,), generator=gen)
            self.labels = torch.nn.functional.one_hot(classes, label_dim).float()
        labels = None if self.labels is None else self.labels.to(teacher.device)
        reference = teacher_sample(teacher, self.z.to(teacher.device), teacher_steps, labels, progress=progress)
        self.reference = reference.float().cpu()
        self._teacher, self._seed = teacher, seed

    @functools.cached_property
    def modes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mixture's (means, variances) when the teacher is exact and no component is a Dirac (no σ),
        else None. Computed on first use: building a probe reads no value."""
        if not self._teacher.exact:
            return None
        means, variances = self._teacher.components()
        return (means, variances) if bool((variances > 0).all()) else None

    @functools.cached_property
    def beyond_3sigma(self) -> dict[str, float]:
        """{"teacher_ode", "exact"}: the teacher ODE's and exact samples' own fractions beyond 3σ; {} without
        modes, and {} when the exact samples' own fraction is one half or more: exact samples of one
        d-dimensional component lie beyond with probability P(χ²_d > 9), 1.1% in 2-D but ≈ 1 in 64-D (the
        digits mixtures), where the figure says nothing about a student."""
        if self.modes is None:
            return {}
        labels = None if self.labels is None else self.labels.to(self._teacher.device)
        exact = self._teacher.sample(self.z.shape[0], torch.Generator().manual_seed(self._seed + 1), labels)
        exact_fraction = fraction_beyond(exact, *self.modes, N_SIGMA)
        if exact_fraction >= 0.5:
            return {}
        return {"teacher_ode": fraction_beyond(self.reference, *self.modes, N_SIGMA), "exact": exact_fraction}

    def measure(self, samples: torch.Tensor) -> dict[str, float]:
        """alignment RMS and sliced W2 against the teacher ODE's samples, and the fraction beyond 3σ of a mode
        when the probe has one (`beyond_3sigma`)."""
        samples = samples.cpu()
        out = {"alignment_rms": rms(samples, self.reference), "sliced_w2": sliced_wasserstein(samples, self.reference)}
        if self.beyond_3sigma:
            out["beyond_3sigma"] = fraction_beyond(samples, *self.modes, N_SIGMA)
        return out


def run_probe(trained, device=None, *, n: int | None = None, seed: int | None = None,
              teacher_steps: int | None = None, progress=None) -> AlignmentProbe:
    """The probe of a trained run (`training.trained.TrainedStudent`) as its `[eval]` section sets it: eval.n_samples
    noises drawn with eval.seed and the teacher's ODE in eval.teacher_steps Heun steps, each replaced where
    given; the teacher runs on `device` (default: where `trained.teacher()` puts it)."""
    e = trained.cfg.eval
    teacher = trained.teacher() if device is None else trained.teacher().to(device)
    return AlignmentProbe(teacher, trained.shape, n or e.n_samples, e.seed if seed is None else seed,
                          teacher_steps or e.teacher_steps, trained.label_dim, progress=progress)
