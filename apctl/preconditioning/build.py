"""From the `[precond]` section to a preconditioning: statistics obtained when the kind needs them,
or the preconditioning restored from a checkpoint's `precond.*` tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from apctl.config import PrecondConfig, StatisticsConfig
from apctl.errors import ApctlError
from apctl.preconditioning.coefficients import AnalyticPrecond, CMPrecond, CTMPrecond, Preconditioning
from apctl.preconditioning.statistics import (
    PrecondStatistics,
    StatisticsSettings,
    estimate_statistics,
    load_statistics,
    statistics_match,
)

PRECONDITIONINGS: dict[str, type] = {"ctm": CTMPrecond, "cm": CMPrecond, "analytic": AnalyticPrecond}


def needs_statistics(cfg: PrecondConfig) -> bool:
    """Whether building this preconditioning takes teacher statistics (Analytic-Precond does)."""
    return PRECONDITIONINGS[cfg.kind].needs_statistics


def statistics_settings(cfg: StatisticsConfig) -> StatisticsSettings:
    return StatisticsSettings(n_points=cfg.n_points, n_samples=cfg.n_samples, batch_size=cfg.batch_size,
                              seed=cfg.seed, derivative=cfg.derivative, ridge=cfg.ridge)


def statistics_samples(cfg: StatisticsConfig, teacher, data_source, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The M fixed (common-random-number) data points x_0 the statistics are estimated on, drawn
    from a CPU generator, in the teacher's dtype and on its device (where the estimate runs)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x0, labels = data_source.sample(n, gen)
    return x0.to(device=teacher.device, dtype=teacher.dtype), None if labels is None else labels.to(teacher.device)


def compute_statistics(cfg: StatisticsConfig, teacher, data_source,
                       progress: Callable[[int, int], None] | None = None) -> PrecondStatistics:
    settings = statistics_settings(cfg)
    x0, labels = statistics_samples(cfg, teacher, data_source, settings.n_samples)
    stats = estimate_statistics(teacher, x0, labels, settings, teacher.fingerprint(), progress)
    stats.extras["teacher_source"] = teacher.source     # so a figure can name the teacher, not just hash it
    return stats


def obtain_statistics(cfg: PrecondConfig, teacher, data_source, cache_path: Path | None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[PrecondStatistics, str]:
    """Statistics from `statistics_file`, else a matching cache file, else computed (and cached).

    Returns the statistics and where they came from ('file', 'cache' or 'computed').
    """
    if cfg.statistics_file:
        stats = load_statistics(cfg.statistics_file)
        if stats.teacher_fingerprint != teacher.fingerprint():
            raise ApctlError(f"{cfg.statistics_file} was computed for teacher {stats.teacher_fingerprint}, "
                             f"not for this teacher ({teacher.fingerprint()}); recompute with `apctl precond compute`")
        return stats, "file"
    settings = statistics_settings(cfg.statistics)
    if cache_path is not None and cache_path.is_file():
        cached = load_statistics(cache_path)
        if statistics_match(cached, teacher.fingerprint(), settings):
            return cached, "cache"
    stats = compute_statistics(cfg.statistics, teacher, data_source, progress)
    if cache_path is not None:
        stats.save(cache_path)
    return stats, "computed"


def precond_from_statistics(stats: PrecondStatistics, form: str = "backward", interpolation: str = "cubic") -> AnalyticPrecond:
    return AnalyticPrecond(stats.lam, stats.l, stats.s, form=form, interpolation=interpolation)


def build_preconditioning(cfg: PrecondConfig, stats: PrecondStatistics | None = None) -> Preconditioning:
    """The preconditioning of `cfg.kind`; `stats` exactly when `needs_statistics(cfg)`."""
    if not needs_statistics(cfg):
        return PRECONDITIONINGS[cfg.kind]()
    if stats is None:
        raise ApctlError("Analytic-Precond needs teacher statistics")
    return precond_from_statistics(stats, cfg.form, cfg.interpolation)


def preconditioning_from_state(cfg: PrecondConfig, state: dict[str, torch.Tensor]) -> Preconditioning:
    """The inverse of `precond.state_dict()`: the preconditioning a checkpoint was trained with."""
    if not needs_statistics(cfg):
        return PRECONDITIONINGS[cfg.kind]()
    return AnalyticPrecond.from_state_dict(state, form=cfg.form, interpolation=cfg.interpolation)
