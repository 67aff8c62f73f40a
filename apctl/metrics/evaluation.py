"""Evaluating a student against its teacher: trajectory alignment and sliced W2 at several NFEs."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from apctl.errors import ApctlError
from apctl.metrics.alignment import AlignmentProbe
from apctl.sampling import SigmaPolicy, sigma_lists, student_sample


def measure(probe: AlignmentProbe, net, precond, grid, nfes: Sequence[int], gamma: float = 0.0,
            batch_size: int = 1024, fid_reference=None, inception_weights: str | None = None,
            policy: SigmaPolicy = SigmaPolicy(), sigmas: Sequence[float] | None = None) -> dict[str, dict]:
    """{"nfe=N": {"alignment_rms", "sliced_w2", "sigmas"[, "fid"]}} for each NFE, from the probe's fixed noise,
    on the σ lists of `policy` (`sigmas`: one explicit σ list instead, reported under its NFE, len − 1).

    With `fid_reference` ("teacher": the probe's teacher-ODE samples; or an EDM-style .npz of
    Inception statistics), image students also get the FID of their samples against it.
    The student samples on its own device (the probe's CPU noise and labels are moved there, batch by
    batch), and FID's Inception network runs there too; samples and features come back to the CPU.
    """
    device = next(net.parameters()).device
    if fid_reference is not None:
        from apctl.metrics.fid import compute_reference_stats

        if len(probe.z.shape) != 4:
            raise ApctlError("FID needs an image student (C, H, W samples)")
        if fid_reference == "teacher":
            fid_reference = compute_reference_stats(probe.reference, weights_path=inception_weights, device=device)
    out = {}
    for levels in sigma_lists(nfes, grid, policy, sigmas):
        nfe = len(levels) - 1
        gen = torch.Generator().manual_seed(0)
        chunks = []
        for start in range(0, probe.z.shape[0], batch_size):
            z = probe.z[start:start + batch_size].to(device)
            y = None if probe.labels is None else probe.labels[start:start + batch_size].to(device)
            chunks.append(student_sample(net, precond, z, levels, y, gamma=gamma, generator=gen).cpu())
        samples = torch.cat(chunks)
        out[f"nfe={nfe}"] = probe.measure(samples) | {"sigmas": levels}
        if fid_reference is not None:
            from apctl.metrics.fid import compute_fid

            out[f"nfe={nfe}"]["fid"] = compute_fid(samples.clamp(-1, 1), fid_reference, inception_weights,
                                                   device=device)["fid"]
    return out


def training_probe(teacher, shape, label_dim: int, n: int, seed: int, teacher_steps: int, grid,
                   nfes: Sequence[int] = (1, 2), progress=None, policy: SigmaPolicy = SigmaPolicy()) -> Callable:
    """probe(run) → {"align_nfe1": …, "align_nfe2": …} for the run's evaluation-EMA student; where the probe has a
    fraction beyond 3σ of a mode (a low-dimensional Gaussian mixture, `AlignmentProbe.beyond_3sigma`) also the
    student's ("beyond3_nfe1", "beyond3_nfe2") and the teacher ODE's own on the same noise ("beyond3_teacher_ode")."""
    probe = AlignmentProbe(teacher, shape, n, seed, teacher_steps, label_dim, progress=progress)

    def evaluate(run) -> dict[str, float]:
        by_nfe = measure(probe, run.ema, run.precond, grid, nfes, policy=policy)
        logs = {f"align_nfe{nfe}": by_nfe[f"nfe={nfe}"]["alignment_rms"] for nfe in nfes}
        if probe.beyond_3sigma:
            logs |= {f"beyond3_nfe{nfe}": by_nfe[f"nfe={nfe}"]["beyond_3sigma"] for nfe in nfes}
            logs["beyond3_teacher_ode"] = probe.beyond_3sigma["teacher_ode"]
        return logs

    return evaluate
