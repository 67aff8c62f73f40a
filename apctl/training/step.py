"""One training step, the same function for the loop and for `bench/`.

    lr            ← lr(step) (training/schedule.py)
    for each micro-batch m of this rank's rows of the global batch (training.batch_per_device):
        x_0, labels  ← data source, drawn per sample g from streams keyed (seed, step, g) (apctl/draws.py)
        loss_m, logs ← objective(model, θ⁻, x_0, labels, the same draws, shared generator (seed, step), step)
        backward of (|m| / share)·loss_m, DDP's all-reduce only after the last micro-batch (no_sync)
    θ             ← optimizer step on the (scaled, then unscaled) gradient, if the loss and ‖∇‖ are
                    finite on every rank (training/guard.py); not taken otherwise
    θ⁻, θ_ema     ← μ·θ⁻ + (1 − μ)·θ,  EMA likewise — only where the step was taken

The accumulated gradient is the mean over the share's rows, and DDP averages the shares, so it is
the global batch's mean gradient whatever the number of processes and micro-batches. Every
per-sample draw depends on the sample's global index, CTM's one k per step comes from the shared
generator of the step, so splitting the batch changes nothing but float rounding — except what a
micro-batch computes as a whole: CTM's adaptive DSM weight λ (per micro-batch, as CTM's code
computes it per micro-batch and per rank) and the dropout masks (torch's global generator, seeded
from (seed, rank, step) and consumed micro-batch after micro-batch).

Nothing here reads a device value on the host but `guard.step_is_finite` (whether to take the
step, as GradScaler.step reads found_inf under fp16); the logs come back as device tensors (the
rows' means) for the loop to accumulate.
"""

from __future__ import annotations

import contextlib
import math

import torch

from apctl.draws import RowDraws, derive_seed
from apctl.errors import ApctlError
from apctl.training import guard
from apctl.training.ema import ema_update
from apctl.training.schedule import learning_rate, set_learning_rate


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator of one (rank, step): independent across (seed, rank, step), reproducible."""
    return torch.Generator().manual_seed(derive_seed(seed, rank, step))


def seed_global_rng(seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators (CPU and every GPU) for step `step`: dropout draws from them, so
    seeding per step keeps a resumed run bit-identical to an uninterrupted one in train mode too."""
    torch.manual_seed(derive_seed(seed, rank, step, 1))


def shared_generator(seed: int, step: int) -> torch.Generator:
    """The generator of draws every rank must agree on in step `step` (e.g. CTM's one k per step)."""
    return torch.Generator().manual_seed(derive_seed(seed, step))


def step_draws(seed: int, step: int, rows: range, batch_size: int) -> RowDraws:
    """The per-sample draws of the rows `rows` of step `step`'s global batch."""
    return RowDraws((seed, step), rows, batch_size)


def micro_batches(batch_size: int, world: int, rank: int, batch_per_device: int) -> list[range]:
    """This rank's rows of the global batch, rank r holding rows [r·share, (r + 1)·share), in micro-batches of
    batch_per_device rows (0, or at least the share: one micro-batch). As EDM's --batch-gpu, the share
    must split evenly; a configuration that does not is refused with one line."""
    if batch_size % world:
        raise ApctlError(f"training.batch_size = {batch_size} is not divisible by the {world} processes")
    share = batch_size // world
    size = share if batch_per_device <= 0 or batch_per_device >= share else batch_per_device
    if share % size:
        raise ApctlError(f"training.batch_per_device = {batch_per_device} does not divide the {share} rows of each "
                         f"process (training.batch_size = {batch_size} over {world} process(es))")
    start = rank * share
    return [range(a, a + size) for a in range(start, start + share, size)]


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def train_step(run, step: int, model: torch.nn.Module, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """One optimizer step of `run` at `step` (`model` is the student, DDP-wrapped under torchrun)."""
    cfg, tc = run.cfg, run.cfg.training
    parts = micro_batches(tc.batch_size, world, rank, tc.batch_per_device)
    share = sum(len(rows) for rows in parts)
    set_learning_rate(run.optimizer, learning_rate(tc, step))
    seed_global_rng(cfg.run.seed, rank, step)
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for n, rows in enumerate(parts):
        draws = step_draws(cfg.run.seed, step, rows, tc.batch_size)
        x0, labels = run.data_source.sample(len(rows), draws)
        x0 = x0.to(run.device, non_blocking=True)
        labels = None if labels is None else labels.to(run.device, non_blocking=True)
        weight = len(rows) / share
        # DDP all-reduces the gradients in the backward of the last micro-batch only.
        last = n == len(parts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(tc.precision, run.device):
                loss, logs = run.objective(model, run.target, x0, labels, draws, shared_generator(cfg.run.seed, step), step)
            run.scaler.scale(loss * weight).backward()
        for key, value in logs.items():
            sums[key] = sums.get(key, 0) + value.detach().float() * weight
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    took = guard.step_is_finite(sums["loss"], grad_norm)
    if took:
        run.scaler.step(run.optimizer)
    run.scaler.update()          # under fp16 a step not taken lowers the loss scale
    if took:
        if run.target is not None:
            ema_update(run.target, run.student, cfg.objective.target_ema)
        ema_update(run.ema, run.student, tc.ema_decay)
    skipped = torch.zeros((), device=grad_norm.device) + (0.0 if took else 1.0)
    return dict(sums, grad_norm=grad_norm.detach(), skipped=skipped)
