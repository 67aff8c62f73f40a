"""`apctl eval level --ckpt RUN`: the student's 2-step figures through each inner level of its grid, and the
lowest (`apctl.metrics.two_step_level`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import (DeviceOpt, GammaOpt, InceptionWeightsOpt, TeacherStepsOpt, ThreadsOpt, Weights,
                               WeightsOpt)
from apctl.errors import ApctlError


def level(
    ckpt: Path = typer.Option(..., "--ckpt", "-c", help="Run directory (latest checkpoint) or a ckpt-*.json."),
    count: Optional[int] = typer.Option(None, "--n", "--count", metavar="N", min=2, help="Probe noises per level (default: the run's eval.n_samples; with --fid, FID images, default eval.fid_samples)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="S", min=0, help="The probe's noise seed (default: the run's eval.seed + 1, noise the run is not reported on). --fid uses seeds 0…N−1, as `apctl eval --fid`."),
    teacher_steps: Optional[int] = TeacherStepsOpt,
    min_level: float = typer.Option(0.0, "--min-level", metavar="σ", min=0.0, help="Only inner grid levels σ ≥ this."),
    max_level: float = typer.Option(float("inf"), "--max-level", metavar="σ", min=0.0, help="Only inner grid levels σ ≤ this."),
    by: Optional[str] = typer.Option(None, "--by", metavar="FIGURE", help="The figure to minimise: alignment_rms, sliced_w2, beyond_3sigma or fid (default: fid with --fid, else beyond_3sigma for a Gaussian-mixture teacher, else sliced_w2)."),
    gamma: float = GammaOpt,
    weights: Weights = WeightsOpt,
    fid: Optional[Path] = typer.Option(None, "--fid", metavar="REF", help="Score each level by FID under EDM's protocol against this .npz (`apctl eval ref`)."),
    batch: int = typer.Option(64, "--batch", metavar="N", min=1, help="With --fid: images generated and scored per batch."),
    inception_weights: Optional[Path] = InceptionWeightsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """The intermediate level of the 2-step sampler, σ_max → σ → σ_min, tried at every inner grid level.

    Consistency models tune this level (Song et al. 2023 search it on FID; openai/consistency_models samples
    ImageNet-64 at --ts 0,22,39). Prints each level's alignment RMS with the teacher's ODE, sliced W2 and (for a
    Gaussian-mixture teacher) the fraction beyond 3σ of a mode, or FID with --fid, and the level with the
    lowest --by figure: sample through it with `--sigmas`, or name it for new runs in [eval.levels]."""
    from apctl.cli.ui import ProgressCallback, console
    from apctl.metrics import two_step_level as tsl
    from apctl.networks.registry import count_parameters
    from apctl.threads import apply_thread_policy
    from apctl.training import distributed
    from apctl.training.run import resolve_device
    from apctl.training.trained import load_trained_student

    if by is not None and by not in tsl.METRICS:
        raise typer.BadParameter(f"must be one of {', '.join(tsl.METRICS)}, got {by!r}", param_hint="'--by'")
    if by == "fid" and fid is None:
        raise ApctlError("--by fid needs the reference statistics: --fid REF.npz (make them with `apctl eval ref`)")
    distributed.init()              # under torchrun each level's FID images are shared out, as `eval --fid` does
    try:
        if fid is None and distributed.world_size() > 1:
            raise ApctlError("under torchrun, eval level shares out only FID images (--fid); run the probe in one process")
        dev = resolve_device(device, "--device")
        trained = load_trained_student(ckpt, weights, dev)
        apply_thread_policy(trained.cfg.run.threads if threads is None else threads, dev, count_parameters(trained.net))
        levels = tsl.inner_levels(trained.grid, min_level, max_level)
        e = trained.cfg.eval
        report = {"checkpoint": str(trained.checkpoint.path), "step": trained.checkpoint.step, "gamma": gamma}
        if fid is not None:
            from apctl.metrics.fid_protocol import reference_record
            from apctl.metrics.inception import load_inception
            from apctl.metrics.model_fid import fid_image_count

            if len(trained.shape) != 3:
                raise ApctlError("FID needs an image student (C, H, W samples); this run's samples are vectors")
            reference, detector = reference_record(fid), load_inception(inception_weights, dev)
            n = fid_image_count(e, count)
            rows = tsl.fid_level_rows(trained, levels, n, reference, detector, weights=weights, gamma=gamma,
                                      batch_size=batch, rank=distributed.rank(), world=distributed.world_size(),
                                      barrier=distributed.barrier)
            by = by or "fid"
            report |= {"n": n, "seeds": f"0…{n - 1}"}
        else:
            from apctl.metrics.alignment import run_probe

            probe_seed = e.seed + 1 if seed is None else seed
            probe = run_probe(trained, dev, n=count, seed=probe_seed, teacher_steps=teacher_steps,
                              progress=None if as_json else ProgressCallback("teacher ODE reference"))
            rows = tsl.level_rows(probe, trained.net, trained.precond, trained.grid, levels, gamma)
            by = by or ("beyond_3sigma" if probe.beyond_3sigma else "sliced_w2")
            report |= {"n": probe.z.shape[0], "seed": probe_seed}
            if probe.beyond_3sigma:
                report["beyond_3sigma"] = probe.beyond_3sigma
        main = distributed.is_main()
    finally:
        distributed.shutdown()
    if not main:
        return
    best = tsl.lowest(rows, by)
    report |= {"by": by, "rows": rows, "best": best}
    if as_json:
        from apctl.strict_json import dumps

        typer.echo(dumps(report, default=float))
        return
    from rich.table import Table

    columns = [m for m in tsl.METRICS if rows and m in rows[0]]
    table = Table(title=f"{trained.cfg.run.name} @ step {trained.checkpoint.step}: 2 steps σ_max → σ → σ_min, "
                        f"γ = {gamma:g}, {report['n']} {'images' if fid else 'noises'}, lowest {by} marked")
    table.add_column("σ")
    for m in columns:
        table.add_column(m)
    for r in rows:
        mark = " ←" if r is best else ""
        table.add_row(f"{r['level']:.4g}", *[(f"{r[m]:.2%}" if m == "beyond_3sigma" else f"{r[m]:.5g}")
                                             + (mark if m == by else "") for m in columns])
    console.print(table)
    s = best["sigmas"]
    console.print(f"lowest {by}: σ = {best['level']:.4g}. Sample through it: --sigmas {s[0]:g},{s[1]:.4g},{s[2]:g}; "
                  f"name it for new runs: --set 'eval.levels.2=[{s[0]:g}, {s[1]:.4g}, {s[2]:g}]'", soft_wrap=True)
