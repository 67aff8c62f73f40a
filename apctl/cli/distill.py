"""`apctl distill`: train a few-step student from a teacher; re-running the same command resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import DataOpt, PresetOpt, SetOpt, TeacherOpt, ThreadsOpt, resolve_config
from apctl.errors import ApctlError


def distill(
    preset: str = PresetOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<run.name>)."),
    overrides: Optional[list[str]] = SetOpt,
    teacher: Optional[Path] = TeacherOpt,
    data: Optional[Path] = DataOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan (the teacher file's network, the data "
                                                           "found or not, device, distance, warnings) and exit; trains "
                                                           "nothing and loads no weights."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Distill a teacher into a few-step student (resumes when re-run).

    Trains a two-time consistency student (CTM or CD objective; Analytic-Precond, CTM or CM
    preconditioning), or tunes a one-time consistency model from the teacher with ECT
    (objective.kind = "ect", e.g. --preset digits-ect). Writes config.toml, precond statistics, checkpoints, metrics.jsonl
    and samples.png to the run directory. Re-run the same command to resume from the last checkpoint;
    under `torchrun --nproc_per_node=K` the global batch is split over K processes."""
    cfg, preset_path = resolve_config(preset, overrides, teacher, data, threads)
    if cfg.objective.kind == "edm":
        raise ApctlError(f"preset {preset!r} trains a teacher (objective.kind = 'edm'); run `apctl teacher train --preset {preset}`")
    run_training("distill", cfg, preset, preset_path, out, dry_run)


def run_training(command: str, cfg, preset: str, preset_path: Path, out: Optional[str], dry_run: bool) -> None:
    """The training run behind `apctl distill` and `apctl teacher train`: the plan, or prepare → train → finish."""
    if out is not None and not out.strip():
        raise ApctlError("--out is empty; give a run directory (default: runs/<run.name>)")
    out = Path(out) if out is not None else Path("runs") / cfg.run.name
    from apctl.cli.ui import console

    if dry_run:
        from rich.table import Table

        from apctl.plan import make_plan

        plan = make_plan(cfg, preset_path, out)
        table = Table(title=f"apctl {command} --preset {preset} (dry run)", show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in plan.rows:
            table.add_row(key, value)
        console.print(table)
        from rich.markup import escape

        console.print(f"warnings ({len(plan.warnings)}):" if plan.warnings else "warnings: none", soft_wrap=True)
        for warning in plan.warnings:
            console.print(f"  [yellow]![/yellow] {escape(warning)}", soft_wrap=True)
        return

    from apctl.cli.ui import TrainingReporter, ProgressCallback
    from apctl.training import distributed
    from apctl.training.run import alignment_probe, finish, prepare, train

    distributed.init()
    reporter, run = None, None
    try:
        reporter = TrainingReporter(command)
        if not distributed.is_main():
            from apctl.training.run import SilentReporter

            reporter = SilentReporter()
        if distributed.is_main():
            _banner(reporter, command, cfg, preset_path, out)
        # The ranks start together: an error every rank meets (a bad batch split, a missing file) then reaches
        # rank 0, the one that prints, before torchrun stops the others for the first rank that failed.
        distributed.barrier()
        run = prepare(cfg, out, reporter)
        probe = alignment_probe(run, ProgressCallback("teacher ODE reference"))
        train(run, reporter, probe)
        if distributed.is_main():
            summary = finish(run)
            for line in summary:
                console.print(line)
    finally:
        if reporter is not None:
            reporter.finish()      # progress closed (cursor back) however the run ended
        if run is not None:
            run.close()            # the run directory's lock
        distributed.shutdown()


def _banner(reporter, command: str, cfg, preset_path: Path, out: Path) -> None:
    """What a log file needs up front: version, device, world size, run directory, the resolved plan."""
    from apctl import __version__
    from apctl.plan import describe_plan
    from apctl.training import distributed
    from apctl.training.run import resolve_device

    reporter.message(f"apctl {__version__} {command}: device {resolve_device(cfg.run.device)}, "
                     f"{distributed.world_size()} process(es), run directory {out}")
    for key, value in describe_plan(cfg, preset_path, out):
        reporter.message(f"  {key}: {value}")     # warnings last, as rows named "warning"
