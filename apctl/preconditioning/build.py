"""From a config to a preconditioning, computing or reusing Analytic-Precond statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from apctl.config import Config
from apctl.errors import ApctlError
from apctl.preconditioning.coefficients import AnalyticPrecond, CMPrecond, CTMPrecond, Preconditioning
from apctl.preconditioning.statistics import (
    PrecondStatistics,
    StatisticsSettings,
    estimate_statistics,
    load_statistics,
    statistics_match,
)


def statistics_settings(cfg: Config) -> StatisticsSettings:
    st = cfg.precond.statistics
    return StatisticsSettings(n_points=st.n_points, n_samples=st.n_samples, batch_size=st.batch_size,
                              seed=st.seed, derivative=st.derivative, ridge=st.ridge)


def statistics_samples(cfg: Config, teacher, data_source, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The M fixed (common-random-number) data points x_0 the statistics are estimated on."""
    gen = torch.Generator().manual_seed(cfg.precond.statistics.seed + 1)
    x0, labels = data_source.sample(n, gen)
    return x0.to(teacher.dtype), labels


def compute_statistics(cfg: Config, teacher, data_source,
                       progress: Callable[[int, int], None] | None = None) -> PrecondStatistics:
    settings = statistics_settings(cfg)
    x0, labels = statistics_samples(cfg, teacher, data_source, settings.n_samples)
    return estimate_statistics(teacher, x0, labels, settings, teacher.fingerprint(), progress)


def obtain_statistics(cfg: Config, teacher, data_source, cache_path: Path | None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[PrecondStatistics, str]:
    """Statistics from `precond.statistics_file`, else a matching cache file, else computed (and cached).

    Returns the statistics and where they came from ('file', 'cache' or 'computed').
    """
    if cfg.precond.statistics_file:
        stats = load_statistics(cfg.precond.statistics_file)
        if stats.teacher_fingerprint != teacher.fingerprint():
            raise ApctlError(f"{cfg.precond.statistics_file} was computed for teacher {stats.teacher_fingerprint}, "
                             f"not for this teacher ({teacher.fingerprint()}); recompute with `apctl precond compute`")
        return stats, "file"
    settings = statistics_settings(cfg)
    if cache_path is not None and cache_path.is_file():
        cached = load_statistics(cache_path)
        if statistics_match(cached, teacher.fingerprint(), settings):
            return cached, "cache"
    stats = compute_statistics(cfg, teacher, data_source, progress)
    if cache_path is not None:
        stats.save(cache_path)
    return stats, "computed"


def precond_from_statistics(stats: PrecondStatistics, form: str = "backward", interpolation: str = "cubic") -> AnalyticPrecond:
    return AnalyticPrecond(stats.lam, stats.l, stats.s, form=form, interpolation=interpolation)


def build_preconditioning(cfg: Config, stats: PrecondStatistics | None) -> Preconditioning:
    kind = cfg.precond.kind
    if kind == "ctm":
        return CTMPrecond()
    if kind == "cm":
        return CMPrecond()
    if stats is None:
        raise ApctlError("Analytic-Precond needs teacher statistics")
    return precond_from_statistics(stats, cfg.precond.form, cfg.precond.interpolation)
