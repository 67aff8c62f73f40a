"""Tables and figures comparing Analytic-Precond's (f, g) with CTM's and CM's on a Karras grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apctl.files import atomic_path
from apctl.preconditioning.coefficients import AnalyticPrecond, CMPrecond, CTMPrecond
from apctl.preconditioning.statistics import PrecondStatistics


def _pair(precond, t: float, s: float) -> tuple[float, float]:
    f, g = precond.coefficients(np.array([t]), np.array([s]))
    return float(f[0]), float(g[0])


def coefficient_rows(stats: PrecondStatistics, grid: np.ndarray, form: str = "backward") -> list[dict]:
    """Per grid level t_i: l, s and (f, g) of the jumps t_i → σ_min and σ_max → t_i for AP, CTM and CM."""
    ap = AnalyticPrecond(stats.lam, stats.l, stats.s, form=form)
    ctm, cm = CTMPrecond(), CMPrecond()
    sigma_min, sigma_max = float(grid[-1]), float(grid[0])
    rows = []
    for t in grid:
        t = float(t)
        lam = -np.log(t)
        row = {"sigma": t, "l": float(ap.l_at(lam)), "s": float(ap.s_at(lam))}
        for name, p in (("ap", ap), ("ctm", ctm), ("cm", cm)):
            row[f"{name}_to_min"] = _pair(p, t, sigma_min)
            row[f"{name}_from_max"] = _pair(p, sigma_max, t)
        rows.append(row)
    return rows


def plot_coefficients(stats: PrecondStatistics, path: str | Path, grid: np.ndarray, form: str = "backward") -> None:
    """Four panels: l_σ, s_σ, and g(σ_max, s), f(σ_max, s) of AP against CTM and CM over the landing level s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = AnalyticPrecond(stats.lam, stats.l, stats.s, form=form)
    sigma = np.exp(-stats.lam)
    fine = np.exp(np.linspace(np.log(grid[-1]), np.log(grid[0]), 200))
    t = float(grid[0])
    curves = {name: np.array([_pair(p, t, float(s)) for s in fine])
              for name, p in (("Analytic-Precond", ap), ("CTM", CTMPrecond()), ("CM", CMPrecond()))}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    axes[0, 0].semilogx(sigma, stats.l, ".-", ms=3)
    axes[0, 0].set(title="l_σ = E tr∇D / d", xlabel="σ")
    axes[0, 1].semilogx(sigma, stats.s, ".-", ms=3, color="C1")
    axes[0, 1].set(title="s_σ (drift of g = D − l·x)", xlabel="σ")
    for name, fg in curves.items():
        axes[1, 0].semilogx(fine, fg[:, 1], label=name)
        axes[1, 1].semilogx(fine, fg[:, 0], label=name)
    axes[1, 0].set(title=f"g({t:g}, s)", xlabel="landing σ = s")
    axes[1, 1].set(title=f"f({t:g}, s)", xlabel="landing σ = s")
    axes[1, 1].set_yscale("symlog", linthresh=1e-4)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for level in grid:
            ax.axvline(level, color="0.9", lw=0.5, zorder=0)
    axes[1, 0].legend()
    fig.suptitle(f"Analytic-Precond ({form} form), teacher {stats.teacher_fingerprint}")
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: matplotlib adds no suffix
        fig.savefig(f, format=Path(path).suffix[1:] or "png", dpi=100)
    plt.close(fig)
