"""How closely a student follows its teacher's ODE, and how far its samples are from the teacher's.

Trajectory alignment for the same noise z:   RMS = √( mean_{b,i} (student_NFE(z)_bi − Φ_teacher(z)_bi)² )
with Φ_teacher the teacher's PF-ODE solved accurately (many Heun steps), both landing at σ_min.

Sliced Wasserstein-2 between equally many samples a, b of dimension d:
    SW₂(a, b) = √( mean_k W₂²(⟨a, θ_k⟩, ⟨b, θ_k⟩) ),   θ_k uniform on the unit sphere,
where the 1-D W₂² of two equal-size samples is the mean squared difference of their sorted values.
"""

from __future__ import annotations

import torch

from apctl.sampling import teacher_sample


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

    def measure(self, samples: torch.Tensor) -> dict[str, float]:
        samples = samples.cpu()
        return {"alignment_rms": rms(samples, self.reference), "sliced_w2": sliced_wasserstein(samples, self.reference)}
