"""EMA-only snapshots every `training.snapshot_every` iterations, for curves over training.

    <run>/snapshots/ckpt-NNNNNNN.safetensors   ema.*, precond.* (Analytic-Precond statistics)
    <run>/snapshots/ckpt-NNNNNNN.json          format, step, resolved config, student architecture,
                                              teacher fingerprint, "snapshot": true
    <run>/snapshots/samples-NNNNNNN.png        its samples, drawn by the loop (`run.write_samples_picture`)

The pair has the checkpoint layout (`apctl.checkpoints`, JSON written last), so
`load_trained_student(snapshot_json, "ema")` reads it, but it has no student, θ⁻ or optimizer: a
fraction of a checkpoint's size, not resumable, and never pruned by `training.keep_checkpoints`.
Resuming reads `<run>/checkpoints/` only, so a snapshot is never mistaken for a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from apctl.checkpoints import list_checkpoints, save_checkpoint
from apctl.errors import MissingFileError

SNAPSHOT_DIR = "snapshots"


def snapshot_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def save_snapshot(run) -> Path | None:
    """At steps that are multiples of `training.snapshot_every` (> 0), on rank 0: write the EMA snapshot of
    `run` (an `apctl.training.run.Run`) unless it exists; returns its JSON path, else None."""
    from apctl.training import distributed

    every = run.cfg.training.snapshot_every
    if not every or run.step % every or not distributed.is_main():
        return None
    directory = snapshot_dir(run.run_dir)
    if (directory / f"ckpt-{run.step:07d}.json").is_file():    # a resumed run re-reaches the same step
        return None
    meta = {"config": run.cfg.to_dict(), "student": run.arch, "snapshot": True,
            "teacher_fingerprint": run.teacher.fingerprint() if run.teacher is not None else ""}
    precond = {f"precond.{k}": v for k, v in run.precond.state_dict().items()} if run.precond else {}
    return save_checkpoint(directory, run.step, meta, {"ema": run.ema}, None, extra_tensors=precond)


def list_snapshots(run_dir: Path) -> list[Path]:
    """A run's snapshot JSONs in step order; a one-line error when it has none."""
    found = list_checkpoints(snapshot_dir(run_dir))
    if not found:
        raise MissingFileError(f"{run_dir} has no snapshots ({snapshot_dir(run_dir)}/ckpt-*.json): train it with "
                               f"--set training.snapshot_every=K to keep the EMA every K iterations")
    return found
