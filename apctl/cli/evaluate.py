"""`apctl eval`: how closely a student follows its teacher's ODE, at several NFEs; with `--fid`, FID under
EDM's protocol (`apctl.cli.eval_fid`). A command group whose callback is the evaluation itself, so
`apctl eval --ckpt RUN …` works as before next to `apctl eval ref …` and `apctl eval curve …`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli import eval_curve, eval_level, eval_ref
from apctl.cli.options import (DeviceOpt, GammaOpt, InceptionWeightsOpt, SigmaSchedule, SigmaScheduleOpt, SigmasOpt,
                               TeacherStepsOpt, ThreadsOpt, Weights, WeightsOpt, parse_sigmas)
from apctl.errors import ApctlError


def _parse_nfes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ApctlError(f"--nfe must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ApctlError(f"--nfe values must be at least 1, got {text!r}")
    return values


app = typer.Typer(invoke_without_command=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Evaluate a student (alignment with the teacher's ODE, FID), make FID references, draw curves.")


@app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", "-c", help="Run directory (latest checkpoint) or a ckpt-*.json."),
    nfe: Optional[str] = typer.Option(None, "--nfe", metavar="N,N,…", help="Comma-separated NFEs to evaluate (default: the run's eval.nfe)."),
    count: Optional[int] = typer.Option(None, "--n", "--count", metavar="N", min=2, help="Samples (default: the run's eval.n_samples; with --fid, FID images, default eval.fid_samples). Under torchrun write --count: torchrun's parser takes --n for its own --nnodes/--nproc-per-node."),
    teacher_steps: Optional[int] = TeacherStepsOpt,
    gamma: float = GammaOpt,
    weights: Weights = WeightsOpt,
    fid: Optional[str] = typer.Option(None, "--fid", metavar="REF",
                                      help="FID under EDM's protocol (image i from seed i, resumable, sharded over torchrun ranks) "
                                           "against an EDM-layout .npz (`apctl eval ref`), or 'teacher' (the teacher's EDM-sampler images)."),
    teacher_row: bool = typer.Option(False, "--teacher-row", help="With --fid: also score the teacher with EDM's deterministic sampler."),
    edm_steps: Optional[int] = typer.Option(None, "--edm-steps", metavar="N", min=2, help="Levels of EDM's sampler for the teacher (2·N − 1 NFE; default eval.edm_steps)."),
    batch: int = typer.Option(64, "--batch", metavar="N", min=1, help="With --fid: images generated and scored per batch (results do not depend on it)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="With --fid: feature cache folder (default <run>/fid-cache)."),
    chunk: int = typer.Option(1000, "--chunk", metavar="N", min=1, help="With --fid: images per cached feature chunk (the unit of resuming and of sharing out over ranks)."),
    inception_weights: Optional[Path] = InceptionWeightsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table (strict JSON: a non-finite number is null)."),
    device: str = DeviceOpt,
    sigma_schedule: Optional[SigmaSchedule] = SigmaScheduleOpt,
    sigmas: Optional[str] = SigmasOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Measure how closely a student follows its teacher's ODE (and its FID).

    Trajectory alignment RMS ‖student_NFE(z) − teacher_ODE(z)‖ for the same noise z, and the sliced
    Wasserstein-2 distance between student and teacher samples. With --fid: FID (KID, Inception
    Score where possible) of seeds 0 … n−1, each number stamped with its protocol."""
    if ctx.invoked_subcommand is not None:
        return
    if ckpt is None:
        raise typer.BadParameter("a run directory or checkpoint is required", param_hint="'--ckpt'")
    nfes = _parse_nfes(nfe) if nfe is not None else None
    levels = parse_sigmas(sigmas)
    if levels is not None:
        nfes = [len(levels) - 1]
    if fid is not None:
        from apctl.cli.eval_fid import fid_table

        return fid_table(ckpt, nfes, count, fid, teacher_row, edm_steps, gamma, weights, inception_weights, as_json,
                         device, sigma_schedule, batch, cache, chunk, threads, levels)
    if teacher_row:
        raise ApctlError("--teacher-row scores the teacher's FID: it needs --fid REF.npz")
    from apctl.cli.ui import ProgressCallback, console
    from apctl.metrics.alignment import run_probe
    from apctl.metrics.evaluation import measure
    from apctl.networks.registry import count_parameters
    from apctl.sampling import SigmaPolicy
    from apctl.threads import apply_thread_policy
    from apctl.training.run import resolve_device
    from apctl.training.trained import load_trained_student

    dev = resolve_device(device, "--device")
    trained = load_trained_student(ckpt, weights, dev)
    apply_thread_policy(trained.cfg.run.threads if threads is None else threads, dev, count_parameters(trained.net))
    e = trained.cfg.eval
    nfes = nfes or list(e.nfe)
    probe = run_probe(trained, dev, n=count, teacher_steps=teacher_steps,
                      progress=None if as_json else ProgressCallback("teacher ODE reference"))
    results = measure(probe, trained.net, trained.precond, trained.grid, nfes, gamma=gamma,
                      policy=SigmaPolicy.of(trained.cfg.eval, sigma_schedule), sigmas=levels)
    report = {"checkpoint": str(trained.checkpoint.path), "step": trained.checkpoint.step,
              "precond": trained.cfg.precond.kind, "objective": trained.cfg.objective.kind,
              "n": probe.z.shape[0], "teacher_steps": teacher_steps or e.teacher_steps, "results": results}
    if probe.beyond_3sigma:      # Gaussian-mixture teachers: the teacher ODE's and exact samples' own fractions
        report["beyond_3sigma"] = probe.beyond_3sigma
    if as_json:
        from apctl.strict_json import dumps

        typer.echo(dumps(report, default=float))
        return
    from rich.table import Table

    b = probe.beyond_3sigma
    table = Table(title=f"{trained.cfg.run.name} @ step {trained.checkpoint.step} ({trained.cfg.precond.kind} precond)",
                  caption=f"beyond 3σ of the nearest mode: teacher ODE {b['teacher_ode']:.2%}, exact samples {b['exact']:.2%}"
                  if b else None)
    for col in ("NFE", "σ list", "alignment RMS", "sliced W2") + (("beyond 3σ",) if b else ()):
        table.add_column(col)
    for n in nfes:
        r = results[f"nfe={n}"]
        row = [str(n), ", ".join(f"{s:.3g}" for s in r["sigmas"]), f"{r['alignment_rms']:.5f}", f"{r['sliced_w2']:.5f}"]
        table.add_row(*row, *([f"{r['beyond_3sigma']:.2%}"] if b else []))
    console.print(table)


app.command("ref")(eval_ref.ref)
app.command("curve")(eval_curve.curve)
app.command("level")(eval_level.level)
