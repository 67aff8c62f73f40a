"""Tables and figures comparing Analytic-Precond's (f, g) with CTM's and CM's on a Karras grid, naming the
teacher the statistics were estimated for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def teacher_name(stats: PrecondStatistics) -> str:
    """The teacher the statistics were estimated for, as the file records it: its source (file name or
    mixture name, when recorded) and fingerprint."""
    source = Path(str(stats.extras.get("teacher_source", ""))).name
    fingerprint = stats.teacher_fingerprint or "no fingerprint recorded"
    return f"{source} ({fingerprint})" if source else fingerprint


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-9, atol=1e-12))


def figure_coefficients(stats: PrecondStatistics, grid: np.ndarray, form: str = "backward", stats_name: str = ""):
    """Four panels over σ (log axis; faint verticals: the Karras grid):
    l_σ and s_σ as estimated; g(σ_max, s) and f(σ_max, s) of Analytic-Precond, CTM and CM over the
    landing level s. Each method has its own colour, line style and marker, so coinciding curves stay
    visible; a curve identical to an earlier one says so in the legend. f is drawn on a log axis when
    every value is positive (symlog below the smallest |f| otherwise). The title and the
    Analytic-Precond legend entry name the teacher recorded in the statistics file."""
    from apctl.plots import new_figure

    ap = AnalyticPrecond(stats.lam, stats.l, stats.s, form=form)
    sigma = np.exp(-stats.lam)
    fine = np.exp(np.linspace(np.log(grid[-1]), np.log(grid[0]), 200))
    t = float(grid[0])
    teacher = teacher_name(stats)
    methods = (  # name, preconditioning, line style, marker, z-order (Analytic-Precond on top)
        (f"Analytic-Precond ({form}), teacher {teacher}", ap, dict(ls="-", lw=2.2, color="C0", zorder=3)),
        ("CTM", CTMPrecond(), dict(ls="--", lw=1.6, color="C1", marker="o", markevery=(5, 20), ms=4, zorder=2)),
        ("CM", CMPrecond(), dict(ls=":", lw=1.8, color="C2", marker="s", markevery=(15, 20), ms=4, zorder=2)),
    )
    curves = [(name, np.array([_pair(p, t, float(s)) for s in fine]), style) for name, p, style in methods]
    fig = new_figure(11, 8)
    axes = fig.subplots(2, 2)
    axes[0, 0].semilogx(sigma, stats.l, ".-", ms=3, color="C0")
    axes[0, 0].set(title="l_σ = E[tr ∇ₓD] / d", ylabel="l_σ")
    axes[0, 1].semilogx(sigma, stats.s, ".-", ms=3, color="C0")
    axes[0, 1].set(title="s_σ (drift of g = D − l_σ·x along λ)", ylabel="s_σ")
    for column, (index, symbol) in enumerate(((1, "g"), (0, "f"))):
        ax = axes[1, column]
        drawn: list[tuple[str, np.ndarray]] = []
        for name, fg, style in curves:
            values = fg[:, index]
            twin = next((other for other, seen in drawn if _same(values, seen)), None)
            short = name.split(", teacher")[0]   # the teacher is named once, in the g panel's legend
            label = (name if column == 0 else short) if twin is None else f"{short} (identical to {twin.split(' (')[0]})"
            ax.semilogx(fine, values, label=label, alpha=0.9, **style)
            drawn.append((name, values))
        ax.set(title=f"{symbol}(σ_max = {t:g}, s)", xlabel="landing level s", ylabel=f"{symbol}({t:g}, s)")
    f_values = np.concatenate([fg[:, 0] for _, fg, _ in curves])
    if (f_values > 0).all():
        axes[1, 1].set_yscale("log")
    else:
        smallest = np.abs(f_values[f_values != 0]).min(initial=1e-12)
        axes[1, 1].set_yscale("symlog", linthresh=smallest)
        axes[1, 1].set_ylabel(f"f({t:g}, s), symlog below {smallest:.1g}")
    for ax in axes[0]:
        ax.set_xlabel("σ  (estimated on a uniform grid in λ = −ln σ)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for level in grid:
            ax.axvline(level, color="0.85", lw=0.6, zorder=0)
    from matplotlib.lines import Line2D

    grid_handle = Line2D([], [], color="0.85", lw=0.6, label=f"Karras grid, N = {len(grid)}")
    # Where the curves are not: g falls from 1 to 0 towards σ_max, f rises from ≈ 0 to 1.
    for ax, corner in zip(axes[1], ("lower left", "upper left")):
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + [grid_handle], fontsize=8, loc=corner)
    source = f"statistics {stats_name}: " if stats_name else "statistics: "
    fig.suptitle(f"Analytic-Precond ({form} form) for teacher {teacher}\n{source}{len(stats.lam)} λ-levels, "
                 f"{stats.settings.get('n_samples', '?')} samples", fontsize=11)
    fig.tight_layout()
    return fig


def plot_coefficients(stats: PrecondStatistics, path: str | Path, grid: np.ndarray, form: str = "backward",
                      stats_name: str = "") -> None:
    """Write `figure_coefficients` to `path` (.png, .pdf, .svg), atomically."""
    from apctl.plots import save_figure

    save_figure(figure_coefficients(stats, grid, form, stats_name), path)
