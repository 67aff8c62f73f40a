"""The rows of an FID table for one checkpoint: the student at each NFE and, on request, the teacher's row.

Each row is `apctl.metrics.fid_protocol.score` of one image maker (`apctl.generation`) over seeds
0 … n−1, so student and teacher rows share the seeds, the reference and the detector. The student
samples with the checkpoint's chosen weights along the default σ list of each NFE (or given σ lists);
the teacher with EDM's deterministic sampler of `eval.edm_steps` levels (2·steps − 1 NFE). Features
are cached under `<run>/fid-cache/<protocol hash>/`, next to the run's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from apctl.generation import StudentImages, TeacherEDMImages
from apctl.metrics.fid_protocol import features_as_reference, model_features, score, weights_digest
from apctl.sampling import SigmaPolicy, sigma_lists


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run directory of a checkpoint or snapshot JSON (<run>/checkpoints/… or <run>/snapshots/…)."""
    return Path(checkpoint_path).resolve().parent.parent


def fid_image_count(eval_cfg, override: int | None = None) -> int:
    """The image count of an FID: `override`, else the run's `eval.fid_samples`."""
    return override or eval_cfg.fid_samples


def student_rows(trained, nfes: Sequence[int], n: int, reference: dict, detector, *, weights: str = "ema",
                 gamma: float = 0.0, schedule: str | None = None, cache_root: Path | None = None,
                 chunk_size: int | None = None, batch_size: int = 64, rank: int = 0, world: int = 1, barrier=None,
                 progress: Callable[[str], Callable[[int, int], None]] | None = None,
                 sigmas: Sequence[float] | None = None) -> list[dict | None]:
    """One scored row per NFE for a `TrainedStudent` (`sigmas`: one row for that explicit σ list instead);
    `progress(label)` makes each row's progress callback."""
    cache_root = cache_root or run_dir_of(trained.checkpoint.path) / "fid-cache"
    identity = {"checkpoint": str(Path(trained.checkpoint.path).resolve()), "step": trained.checkpoint.step,
                "weights_sha256": weights_digest(trained.net)}
    rows = []
    for levels in sigma_lists(nfes, trained.grid, SigmaPolicy.of(trained.cfg.eval, schedule), sigmas):
        maker = StudentImages(trained.net, trained.precond, levels, gamma, trained.shape, trained.label_dim, weights)
        rows.append(score(maker, identity, n, reference, detector, cache_root, chunk_size=chunk_size,
                          batch_size=batch_size, rank=rank, world=world, barrier=barrier,
                          progress=progress(f"student NFE {len(levels) - 1}") if progress else None))
    return rows


def _teacher_images(trained, steps: int | None) -> TeacherEDMImages:
    device = next(trained.net.parameters()).device
    teacher = trained.teacher().to(device)
    return TeacherEDMImages(teacher, steps or trained.cfg.eval.edm_steps, trained.shape, trained.label_dim)


def teacher_row(trained, n: int, reference: dict, detector, *, steps: int | None = None,
                cache_root: Path | None = None, chunk_size: int | None = None, batch_size: int = 64, rank: int = 0,
                world: int = 1, barrier=None,
                progress: Callable[[str], Callable[[int, int], None]] | None = None) -> dict | None:
    """The teacher of a `TrainedStudent` under the same protocol, sampled with EDM's deterministic sampler of
    `steps` levels (default: the run's `eval.edm_steps`)."""
    maker = _teacher_images(trained, steps)
    cache_root = cache_root or run_dir_of(trained.checkpoint.path) / "fid-cache"
    return score(maker, {"teacher_fingerprint": maker.teacher.fingerprint()}, n, reference, detector, cache_root,
                 chunk_size=chunk_size, batch_size=batch_size, rank=rank, world=world, barrier=barrier,
                 progress=progress(f"teacher, {maker.nfe} NFE") if progress else None)


def teacher_reference(trained, n: int, detector, *, steps: int | None = None, cache_root: Path | None = None,
                      chunk_size: int | None = None, batch_size: int = 64, rank: int = 0, world: int = 1,
                      barrier=None, progress: Callable[[str], Callable[[int, int], None]] | None = None) -> dict | None:
    """`--fid teacher`: the teacher's own images (EDM's sampler, seeds 0 … n−1 — the students' seeds, so the
    noise is paired) as the reference; None on ranks other than 0."""
    maker = _teacher_images(trained, steps)
    cache_root = cache_root or run_dir_of(trained.checkpoint.path) / "fid-cache"
    feats, _ = model_features(maker, {"teacher_fingerprint": maker.teacher.fingerprint()}, n, detector, cache_root,
                              chunk_size=chunk_size, batch_size=batch_size, rank=rank, world=world, barrier=barrier,
                              progress=progress(f"teacher reference, {maker.nfe} NFE") if progress else None)
    if feats is None:
        return None
    return features_as_reference(feats["pool3"], f"teacher ({maker.protocol()['sampler']}, {maker.nfe} NFE, "
                                                 f"seeds 0-{n - 1})")
