"""`apctl precond compute | plot | inspect`: Analytic-Precond's teacher statistics and coefficients."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from apctl.cli.options import (DataOpt, DeviceOpt, OutputAliasOpt, PresetOpt, SetOpt, TeacherOpt, ThreadsOpt,
                               out_path, resolve_config)
from apctl.errors import ApctlError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Estimate, plot and inspect Analytic-Precond's statistics l_σ, s_σ and coefficients f, g.")

GridOpt = typer.Option(None, "--grid", metavar="N", min=2, show_default=False,
                       help="Karras grid size N for the comparison. Default: the run's objective.grid_points when STATS "
                            "sits in a run directory (beside its config.toml), else 18 (CIFAR-10/FFHQ; ImageNet: 40).")
Form = Literal["backward", "forward"]
FormOpt = typer.Option(None, "--form", show_default=False,
                       help="Analytic-Precond's form: backward or forward. Default: the run's precond.form when STATS "
                            "sits in a run directory, else backward (recommended).")
DEFAULT_GRID, DEFAULT_FORM = 18, "backward"


def grid_and_form(stats_file: Path, grid: int | None, form: str | None) -> tuple[int, str, str]:
    """(N, form, note): the options as given; where one is not, the run's own when `stats_file` sits in a run
    directory (beside its config.toml; the note then names that file), else N = 18 (CIFAR-10's) and backward."""
    config = stats_file.parent / "config.toml"
    if (grid is not None and form is not None) or not config.is_file():
        return grid or DEFAULT_GRID, form or DEFAULT_FORM, ""
    from apctl.presets import load_config

    run, _ = load_config(str(config))
    return grid or run.objective.grid_points, form or run.precond.form, f"as in {stats_file.parent.name}/config.toml"


@app.callback()
def _precond() -> None:
    """Estimate, plot and inspect Analytic-Precond's statistics and coefficients."""


@app.command("compute")
def compute(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Statistics file to write (.safetensors); required."),
    preset: str = PresetOpt,
    overrides: Optional[list[str]] = SetOpt,
    teacher: Optional[Path] = TeacherOpt,
    data: Optional[Path] = DataOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    output_alias: Optional[Path] = OutputAliasOpt,
) -> None:
    """Estimate l_σ and s_σ from a teacher and save them.

    l_σ by Hutchinson traces through JVPs and s_σ (JVP along the PF-ODE) from the preset's teacher
    on its data, with the preset's [precond.statistics] settings; save them with the teacher's fingerprint."""
    output = out_path(out, output_alias)
    if output.suffix != ".safetensors":
        raise ApctlError(f"--out must end in .safetensors, got {output}")
    if output.exists() and not force:
        raise ApctlError(f"{output} already exists; pass --force to overwrite")
    cfg, _ = resolve_config(preset, overrides, teacher, data, threads)
    from apctl.cli.ui import ProgressCallback, console
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.networks.registry import count_parameters
    from apctl.preconditioning.build import compute_statistics
    from apctl.teachers import build_teacher
    from apctl.threads import apply_thread_policy
    from apctl.training.run import resolve_device

    dev = resolve_device(device, "--device")
    data_set = load_training_data(cfg.data)
    t = build_teacher(cfg.teacher, data_set)
    apply_thread_policy(cfg.run.threads, dev, count_parameters(t.network) if t.network is not None else 0)
    t = t.to(dev)
    stats = compute_statistics(cfg.precond.statistics, t, build_data_source(cfg.data, t, data_set),
                               ProgressCallback("l_σ, s_σ"))
    stats.save(output)
    console.print(f"{len(stats.lam)} levels, σ ∈ [{stats.sigma.min():g}, {stats.sigma.max():g}], "
                  f"l ∈ [{stats.l.min():.3g}, {stats.l.max():.3g}], s ∈ [{stats.s.min():.3g}, {stats.s.max():.3g}] → {output}")


@app.command("plot")
def plot(
    stats_file: Path = typer.Argument(..., metavar="STATS", help="Statistics file from `apctl precond compute`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure to write (.png, .pdf or .svg); required."),
    grid: Optional[int] = GridOpt,
    form: Optional[Form] = FormOpt,
    output_alias: Optional[Path] = OutputAliasOpt,
) -> None:
    """Plot l_σ, s_σ and f, g against CTM's and CM's.

    Panels: l_σ, s_σ, and the coefficients g(σ_max, s), f(σ_max, s) against CTM's and CM's; titled
    with the teacher the statistics file records (source and fingerprint)."""
    output = out_path(out, output_alias)
    if output.suffix not in (".png", ".pdf", ".svg"):
        raise ApctlError(f"--out must end in .png, .pdf or .svg, got {output}")
    from apctl.cli.ui import console
    from apctl.preconditioning.report import plot_coefficients
    from apctl.preconditioning.statistics import load_statistics
    from apctl.schedules import karras_sigmas

    stats = load_statistics(stats_file)
    grid, form, _ = grid_and_form(stats_file, grid, form)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_coefficients(stats, output, karras_sigmas(grid), form, stats_file.name)
    console.print(f"figure → {output}")


@app.command("inspect")
def inspect(
    stats_file: Path = typer.Argument(..., metavar="STATS", help="Statistics file from `apctl precond compute`."),
    grid: Optional[int] = GridOpt,
    form: Optional[Form] = FormOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (full-precision numbers) instead of a table."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV (a header, then one row per grid level; full precision)."),
) -> None:
    """Print l, s and f, g against CTM's and CM's on the grid.

    A table over the Karras grid: l, s, and (f, g) of the single jump t → σ_min and of σ_max → t,
    for Analytic-Precond, CTM and CM. --json and --csv print every number in full (Python's repr,
    which reads back to the same float)."""
    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv", param_hint="'--json' / '--csv'")
    from apctl.cli.ui import console
    from apctl.preconditioning.report import coefficient_rows
    from apctl.preconditioning.statistics import load_statistics
    from apctl.schedules import karras_sigmas

    stats = load_statistics(stats_file)
    grid, form, note = grid_and_form(stats_file, grid, form)
    rows = coefficient_rows(stats, karras_sigmas(grid), form)
    if as_json:
        from apctl.strict_json import dumps

        typer.echo(dumps({"teacher_fingerprint": stats.teacher_fingerprint, "levels": len(stats.lam),
                          "settings": stats.settings, "grid": grid, "form": form, "rows": _flat_rows(rows)}))
        return
    if as_csv:
        flat = _flat_rows(rows)
        typer.echo(",".join(flat[0]))
        for r in flat:
            typer.echo(",".join(repr(v) for v in r.values()))
        return
    from rich.table import Table

    console.print(f"teacher {stats.teacher_fingerprint}; {len(stats.lam)} λ-levels; settings {stats.settings}",
                  soft_wrap=True)
    fmt = lambda fg: f"{fg[0]:.4f}, {fg[1]:.4f}"  # noqa: E731
    table = Table(title=f"(f, g) on the N = {grid} Karras grid, Analytic-Precond {form} form" + (f" ({note})" if note else ""))
    for col in ("σ", "l", "s", "AP t→σmin", "CTM t→σmin", "CM t→σmin", "AP σmax→t", "CTM σmax→t", "CM σmax→t"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(f"{r['sigma']:.4g}", f"{r['l']:.4f}", f"{r['s']:+.4f}",
                      fmt(r["ap_to_min"]), fmt(r["ctm_to_min"]), fmt(r["cm_to_min"]),
                      fmt(r["ap_from_max"]), fmt(r["ctm_from_max"]), fmt(r["cm_from_max"]))
    if not console.is_terminal:
        # Piped or redirected, rich assumes 80 columns and would cut numbers short ("-0.00…"): print it whole.
        from rich.console import Console

        Console(highlight=False, width=10_000).print(table)      # a table is as wide as its content, no wider
        return
    console.print(table)


def _flat_rows(rows: list[dict]) -> list[dict[str, float]]:
    """coefficient_rows with each (f, g) pair split into `<jump>_f` and `<jump>_g` (the --json/--csv columns)."""
    flat = []
    for r in rows:
        out = {}
        for key, value in r.items():
            if isinstance(value, tuple):
                out[f"{key}_f"], out[f"{key}_g"] = float(value[0]), float(value[1])
            else:
                out[key] = float(value)
        flat.append(out)
    return flat
