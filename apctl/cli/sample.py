"""`apctl sample`: few-step samples from a student checkpoint (or the teacher's Heun ODE for reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import (DeviceOpt, SigmaSchedule, SigmaScheduleOpt, SigmasOpt, ThreadsOpt, Weights, WeightsOpt,
                               parse_sigmas)
from apctl.errors import ApctlError


def _teacher_reference(trained, count: int, labels, gen, device):
    """(samples, legend text) of the teacher for a 2-D picture: exact draws when it has them, else its
    ODE with the run's `eval.teacher_steps` Heun steps, on the student's classes."""
    import torch

    from apctl.sampling import teacher_sample

    teacher = trained.teacher().to(device)
    if teacher.exact:
        classes = None if labels is None else labels.argmax(1)
        return teacher.sample(count, gen, labels=classes).cpu().numpy(), "teacher (exact samples)"
    steps = trained.cfg.eval.teacher_steps
    z = torch.randn((count, *trained.shape), generator=gen)     # CPU noise: teacher_sample moves it to the teacher
    return teacher_sample(teacher, z, steps, labels).numpy(), f"teacher ODE ({steps} Heun steps)"


def sample(
    ckpt: Path = typer.Option(..., "--ckpt", "-c", help="Run directory (latest checkpoint) or a ckpt-*.json."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz (samples, labels: the class of each sample, −1 for an unconditional student; sigmas); a .png grid/scatter is written beside it."),
    nfe: int = typer.Option(2, "--nfe", "-n", help="Network evaluations: the σ list the run names for this NFE in [eval.levels], else a Karras schedule of NFE+1 levels (snapped to the training grid unless the run's eval.sigmas = 'karras')."),
    sigmas: Optional[str] = SigmasOpt,
    count: int = typer.Option(64, "--n", metavar="N", min=1, help="How many samples."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    gamma: float = typer.Option(0.0, "--gamma", metavar="γ", min=0.0, max=1.0, help="CTM γ: 0 deterministic jumps, 1 CM-style re-noising."),
    label: Optional[int] = typer.Option(None, "--label", help="Class for all samples (class-conditional students; default: cycle over classes)."),
    weights: Weights = WeightsOpt,
    teacher_steps: int = typer.Option(0, "--teacher-steps", help="Sample the teacher's Heun ODE with this many steps instead (reference)."),
    device: str = DeviceOpt,
    sigma_schedule: Optional[SigmaSchedule] = SigmaScheduleOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Draw few-step samples from a student (or the teacher's Heun ODE).

    CTM γ-sampling over the σ list; writes an .npz (samples; labels, the class index of each sample
    or −1 for every sample of an unconditional student; sigmas) and a .png beside it.
    """
    if out.suffix != ".npz":
        raise ApctlError(f"--out must end in .npz, got {out}")
    if teacher_steps < 0 or teacher_steps == 1:
        raise ApctlError("--teacher-steps must be 0 (use the student) or at least 2")
    explicit = parse_sigmas(sigmas)       # a bad list is one line before the checkpoint is read
    import numpy as np
    import torch

    from apctl.cli.ui import ProgressCallback, console
    from apctl.networks.registry import count_parameters
    from apctl.plots import plot_samples
    from apctl.threads import apply_thread_policy
    from apctl.sampling import SigmaPolicy, class_labels, student_sample, teacher_sample
    from apctl.training.run import resolve_device
    from apctl.training.trained import load_trained_student

    dev = resolve_device(device, "--device")
    trained = load_trained_student(ckpt, weights, dev)
    apply_thread_policy(trained.cfg.run.threads if threads is None else threads, dev, count_parameters(trained.net))
    sigma_list = explicit or SigmaPolicy.of(trained.cfg.eval, sigma_schedule).sigmas(nfe, trained.grid)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((count, *trained.shape), generator=gen)
    labels = None
    if trained.label_dim:
        if label is not None and not 0 <= label < trained.label_dim:
            raise ApctlError(f"--label must be in 0…{trained.label_dim - 1}, got {label}")
        labels = class_labels(count, trained.label_dim, label)
    elif label is not None:
        raise ApctlError("--label given, but this student is unconditional")
    if teacher_steps:
        teacher = trained.teacher().to(dev)
        x = teacher_sample(teacher, z, teacher_steps, labels, progress=ProgressCallback("teacher Heun"))
        what = f"teacher Heun, {teacher_steps} steps ({2 * teacher_steps - 1} NFE)"
    else:
        x = student_sample(trained.net, trained.precond, z.to(dev), sigma_list,
                           None if labels is None else labels.to(dev), gamma=gamma, generator=gen).cpu()
        what = f"student, {len(sigma_list) - 1} NFE, σ = {', '.join(f'{s:g}' for s in sigma_list)}, γ = {gamma:g}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # `labels` is always there, so a reader needs no special case: −1 marks "no class".
    class_index = labels.argmax(1).numpy() if labels is not None else np.full(count, -1)
    arrays = {"samples": x.numpy(), "labels": class_index.astype(np.int64), "sigmas": np.asarray(sigma_list)}
    from apctl.files import atomic_path

    with atomic_path(out) as tmp, open(tmp, "wb") as f:     # a file object: np.savez adds no suffix to it
        np.savez(f, **arrays)
    png = out.with_suffix(".png")
    name = trained.cfg.run.name
    title = f"{name}: {what}" if teacher_steps else f"{name}: {weights} weights, step {trained.checkpoint.step}\n{what}"
    if len(trained.shape) == 3:
        plot_samples(x.numpy(), png, title=title, labels=arrays.get("labels"))
    else:   # 2-D: the teacher's samples on the same axes (drawn after the student's, so these are unchanged)
        reference, reference_label = _teacher_reference(trained, count, labels, gen, dev)
        plot_samples(x.numpy(), png, reference, title=title, reference_label=reference_label,
                     sample_label=f"teacher ODE ({teacher_steps} Heun steps)" if teacher_steps
                     else f"student ({len(sigma_list) - 1} NFE)")
    console.print(f"{count} samples ({what}) → {out} and {png}")
