"""The distill recipe around the training loop: the alignment probe before, samples and a summary after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apctl.config import Config
from apctl.evaluation import training_probe
from apctl.training.run import Run, prepare


def start_run(cfg: Config, out: Path, reporter, probe_progress=None):
    """Prepare (or resume) the run; build the alignment probe if `training.eval_every` asks for one."""
    run = prepare(cfg, out, reporter)
    probe = None
    if cfg.training.eval_every:
        e = cfg.eval
        probe = training_probe(run.teacher, run.teacher.shape, run.data_source.label_dim, min(e.n_samples, 1024),
                               e.seed, e.teacher_steps, run.objective.grid.numpy(), progress=probe_progress)
    return run, probe


@torch.no_grad()
def final_samples(run: Run, n: int = 1024, nfe: int = 2) -> tuple[np.ndarray, np.ndarray | None]:
    """`nfe`-step samples of the evaluation EMA and, for analytic teachers, exact teacher samples."""
    from apctl.sampling import default_sigmas, student_sample

    gen = torch.Generator().manual_seed(run.cfg.eval.seed)
    z = torch.randn((n, *run.teacher.shape), generator=gen)
    labels = None
    if run.data_source.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(n) % run.data_source.label_dim, run.data_source.label_dim).float()
    samples = student_sample(run.ema, run.precond, z.to(run.device), default_sigmas(nfe, run.objective.grid.numpy()),
                             None if labels is None else labels.to(run.device))
    reference = run.teacher.sample(n, gen).float().numpy() if hasattr(run.teacher, "sample") else None
    return samples.cpu().numpy(), reference


def finish_run(run: Run) -> list[str]:
    """Write samples.png and return summary lines."""
    from apctl.plots import plot_samples

    image = run.teacher.shape.__len__() == 3
    samples, reference = final_samples(run, n=64 if image else 1024)
    path = run.run_dir / "samples.png"
    plot_samples(samples, path, None if image else reference, title=f"{run.cfg.run.name}: 2-step samples, step {run.step}")
    lines = [f"run directory: {run.run_dir}", f"2-step samples: {path}"]
    last = next((h for h in reversed(run.history) if "align_nfe2" in h), None)
    if last:
        lines.append(f"alignment RMS vs teacher ODE at step {last['step']}: "
                     f"1 step {last['align_nfe1']:.4f}, 2 steps {last['align_nfe2']:.4f}")
    return lines
