"""The 2-step sampler's intermediate level: a student's figures through each inner level of its grid.

Consistency models tune the middle time of their 2-step sampler: Song et al. (2023) ternary-search it on
FID over the training grid (openai/consistency_models samples ImageNet-64 at `--ts 0,22,39` of 40 levels).
A grid has few levels (18–40) and one level costs one 2-step sample set, so this measures all of them:
for each inner level σ_m of the grid within [lo, hi], the sample along

    σ_max → σ_m → σ_min        (CTM γ-sampling, `apctl.sampling.student_sample`; γ = 0 by default)

scored as `apctl eval --sigmas σ_max,σ_m,σ_min` scores it: alignment RMS with the teacher's ODE, sliced W2
and, for a Gaussian mixture, the fraction beyond 3σ of a mode (`level_rows`, on an `AlignmentProbe`); or
FID under EDM's protocol (`fid_level_rows`). The level with the lowest figure (`lowest`) is what
`[eval.levels]` then names (`2 = [σ_max, σ_m, σ_min]`). Choose it on noise the run is not reported on
(a probe seed other than `eval.seed`), as bench/toy2d_two_step_level.py does for toy2d.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from apctl.errors import ApctlError

# The figures a level row may carry, each lower-is-better.
METRICS = ("alignment_rms", "sliced_w2", "beyond_3sigma", "fid")


def inner_levels(grid: np.ndarray, lo: float = 0.0, hi: float = math.inf) -> list[float]:
    """The grid's levels strictly between its ends (σ_max, σ_min) with lo ≤ σ ≤ hi, decreasing."""
    levels = [float(s) for s in grid[1:-1] if lo <= s <= hi]
    if not levels:
        raise ApctlError(f"no inner level of the {len(grid)}-point grid lies in [{lo:g}, {hi:g}]")
    return levels


def two_step_sigmas(grid: np.ndarray, level: float) -> list[float]:
    """σ_max → level → σ_min on the grid's ends."""
    return [float(grid[0]), float(level), float(grid[-1])]


def level_rows(probe, net, precond, grid: np.ndarray, levels: Sequence[float], gamma: float = 0.0) -> list[dict]:
    """[{"level", "sigmas", "alignment_rms", "sliced_w2"[, "beyond_3sigma"]}] per level, on the probe's noise."""
    from apctl.metrics.evaluation import measure

    rows = []
    for level in levels:
        r = measure(probe, net, precond, grid, [2], gamma=gamma, sigmas=two_step_sigmas(grid, level))["nfe=2"]
        rows.append({"level": level} | r)
    return rows


def fid_level_rows(trained, levels: Sequence[float], n: int, reference: dict, detector, **scoring) -> list[dict]:
    """[{"level", "sigmas", "fid", …, "protocol"}] per level: `model_fid.student_rows` on that σ list (image i
    from seed i, cached and resumable as `apctl eval --fid`)."""
    from apctl.metrics.model_fid import student_rows

    rows = []
    for level in levels:
        sigmas = two_step_sigmas(trained.grid, level)
        row = student_rows(trained, [], n, reference, detector, sigmas=sigmas, **scoring)[0]
        rows.append(None if row is None else {"level": level, "sigmas": sigmas} | row)
    return rows


def lowest(rows: Sequence[dict], metric: str) -> dict:
    """The row with the lowest `metric` (the first of equals, i.e. the highest level)."""
    if metric not in METRICS:
        raise ApctlError(f"--by must be one of {', '.join(METRICS)}, got {metric!r}")
    scored = [r for r in rows if r.get(metric) is not None and math.isfinite(r[metric])]
    if not scored:
        raise ApctlError(f"no level has a {metric} figure (beyond_3sigma needs a Gaussian-mixture teacher, fid --fid)")
    return min(scored, key=lambda r: r[metric])


__all__ = ["METRICS", "fid_level_rows", "inner_levels", "level_rows", "lowest", "two_step_sigmas"]
