"""One training step, the same function for the loop and for `bench/`.

    x_0, labels  ← data source, from the step's generator (seed, rank, step); torch's global generators
                   (dropout) are seeded from (seed, rank, step) too
    loss, logs   ← objective(model, θ⁻, x_0, labels, generator, shared generator (seed, step))
    θ            ← optimizer step on the (scaled, then unscaled) gradient
    θ⁻, θ_ema    ← μ·θ⁻ + (1 − μ)·θ,  EMA likewise — only where the step was taken

With fp16 the gradient scaler skips a step whose unscaled gradient has a non-finite value; the
target and the EMA then skip it too (CTM's `run_step`), decided on the device: `took` is
isfinite(‖∇‖) as a tensor, and the EMA weight is (1 − μ)·took. Nothing here reads a device value
on the host; the logs come back as device tensors for the loop to accumulate.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from apctl.training.ema import ema_update


def _seed(*words: int) -> int:
    """A 64-bit seed from a word sequence, independent across different sequences (NumPy's SeedSequence)."""
    entropy = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return int(entropy[0]) << 32 | int(entropy[1])


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of one training step: independent across (seed, rank, step), reproducible."""
    return torch.Generator().manual_seed(_seed(seed, rank, step))


def seed_global_rng(seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators (CPU and every GPU) for step `step`: dropout draws from them, so
    seeding per step keeps a resumed run bit-identical to an uninterrupted one in train mode too."""
    torch.manual_seed(_seed(seed, rank, step, 1))


def shared_generator(seed: int, step: int) -> torch.Generator:
    """The generator of draws every rank must agree on in step `step` (e.g. CTM's one k per step)."""
    return torch.Generator().manual_seed(_seed(seed, step))


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def train_step(run, step: int, model: torch.nn.Module, rank: int = 0, per_rank: int | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step of `run` at `step` (`model` is the student, DDP-wrapped under torchrun)."""
    cfg, tc = run.cfg, run.cfg.training
    seed_global_rng(cfg.run.seed, rank, step)
    gen = step_generator(cfg.run.seed, rank, step)
    x0, labels = run.data_source.sample(per_rank or tc.batch_size, gen)
    x0 = x0.to(run.device, non_blocking=True)
    labels = None if labels is None else labels.to(run.device, non_blocking=True)
    with autocast(tc.precision, run.device):
        loss, logs = run.objective(model, run.target, x0, labels, gen, shared_generator(cfg.run.seed, step))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    took = torch.isfinite(grad_norm) if run.scaler.is_enabled() else torch.ones((), dtype=torch.bool, device=grad_norm.device)
    if run.target is not None:
        ema_update(run.target, run.student, cfg.objective.target_ema, took)
    ema_update(run.ema, run.student, tc.ema_decay, took)
    return dict(logs, grad_norm=grad_norm.detach(), skipped=(~took).float())
