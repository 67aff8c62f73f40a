"""Evaluating a student against its teacher: trajectory alignment and sliced W2 at several NFEs."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from apctl.metrics.alignment import AlignmentProbe
from apctl.sampling import default_sigmas, student_sample


def measure(probe: AlignmentProbe, net, precond, grid, nfes: Sequence[int], gamma: float = 0.0,
            batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """{"nfe=N": {"alignment_rms", "sliced_w2"}} for each NFE, from the probe's fixed noise."""
    out = {}
    for nfe in nfes:
        sigmas = default_sigmas(nfe, grid)
        gen = torch.Generator().manual_seed(0)
        chunks = []
        for start in range(0, probe.z.shape[0], batch_size):
            z = probe.z[start:start + batch_size]
            y = None if probe.labels is None else probe.labels[start:start + batch_size]
            chunks.append(student_sample(net, precond, z, sigmas, y, gamma=gamma, generator=gen))
        out[f"nfe={nfe}"] = probe.measure(torch.cat(chunks)) | {"sigmas": sigmas}
    return out


def training_probe(teacher, shape, label_dim: int, n: int, seed: int, teacher_steps: int, grid,
                   nfes: Sequence[int] = (1, 2), progress=None) -> Callable:
    """probe(run) → {"align_nfe1": …, "align_nfe2": …} for the run's evaluation-EMA student."""
    probe = AlignmentProbe(teacher, shape, n, seed, teacher_steps, label_dim, progress=progress)

    def evaluate(run) -> dict[str, float]:
        results = measure(probe, run.ema, run.precond, grid, nfes)
        return {f"align_nfe{nfe}": results[f"nfe={nfe}"]["alignment_rms"] for nfe in nfes}

    return evaluate
