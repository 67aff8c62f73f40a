"""`apctl eval --ckpt RUN --fid REF`: the FID table of a checkpoint (student rows, the teacher's row), printed
with its protocol. Under `torchrun --nproc_per_node=K` the images are shared out over K processes;
rank 0 prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from apctl.errors import ApctlError


def fid_table(ckpt: Path, nfes: Optional[list[int]], count: Optional[int], fid: str, with_teacher: bool,
              edm_steps: Optional[int], gamma: float, weights: str, inception_weights: Optional[Path], as_json: bool,
              device: str, sigma_schedule: Optional[str], batch: int, cache: Optional[Path], chunk: int,
              threads: Optional[int] = None, sigmas: Optional[list[float]] = None) -> None:
    """`nfes` None: the run's eval.nfe; `threads` None: the run's run.threads (apctl.threads); `sigmas`: one row
    for that σ list (then `nfes` is its NFE)."""
    from apctl.cli.ui import CountProgress
    from apctl.metrics.fid_protocol import reference_record
    from apctl.metrics.inception import load_inception
    from apctl.metrics.model_fid import fid_image_count, student_rows, teacher_reference, teacher_row
    from apctl.networks.registry import count_parameters
    from apctl.threads import apply_thread_policy
    from apctl.training import distributed
    from apctl.training.run import resolve_device
    from apctl.training.trained import load_trained_student

    distributed.init()
    try:
        dev = resolve_device(device, "--device")
        trained = load_trained_student(ckpt, weights, dev)
        apply_thread_policy(trained.cfg.run.threads if threads is None else threads, dev, count_parameters(trained.net))
        nfes = nfes or list(trained.cfg.eval.nfe)
        if len(trained.shape) != 3:
            raise ApctlError("FID needs an image student (C, H, W samples); this run's samples are vectors")
        # Everything that can fail on a file is read before any image is made.
        reference = None if fid == "teacher" else reference_record(fid)
        detector = load_inception(inception_weights, dev)
        n = fid_image_count(trained.cfg.eval, count)
        main = distributed.is_main()
        shared = dict(cache_root=cache, chunk_size=chunk, batch_size=batch, rank=distributed.rank(), world=distributed.world_size(),
                      barrier=distributed.barrier,
                      progress=(lambda label: CountProgress(f"FID, {label}")) if main and not as_json else None)
        if reference is None:
            reference = teacher_reference(trained, n, detector, steps=edm_steps, **shared)
        rows = student_rows(trained, nfes, n, reference, detector, weights=weights, gamma=gamma,
                            schedule=sigma_schedule, sigmas=sigmas, **shared)
        teacher = teacher_row(trained, n, reference, detector, steps=edm_steps, **shared) if with_teacher else None
    finally:
        distributed.shutdown()
    if not main:
        return
    report = {"checkpoint": str(trained.checkpoint.path), "step": trained.checkpoint.step,
              "precond": trained.cfg.precond.kind, "objective": trained.cfg.objective.kind, "n": n,
              "results": {f"nfe={k}": r for k, r in zip(nfes, rows)}}
    if teacher is not None:
        report["teacher"] = teacher
    if as_json:
        typer.echo(json.dumps(report, default=float))
        return
    print_fid_table(f"{trained.cfg.run.name} @ step {trained.checkpoint.step} ({trained.cfg.precond.kind} precond)",
                    [(f"student ({weights})", r) for r in rows] + ([("teacher", teacher)] if teacher else []))


def print_fid_table(title: str, rows: list[tuple[str, dict]]) -> None:
    """One line per scored row (FID, KID, IS), then the protocol they share and what each row adds."""
    from rich.table import Table

    from apctl.cli.ui import console

    table = Table(title=title)
    for col in ("model", "NFE", "σ list", "γ", "FID", "KID ×10³", "IS"):
        table.add_column(col)
    for name, r in rows:
        p = r["protocol"]
        sig = p["sigmas"] if len(p["sigmas"]) <= 6 else p["sigmas"][:3] + ["…"] + p["sigmas"][-2:]
        table.add_row(name, str(p["nfe"]), ", ".join(s if isinstance(s, str) else f"{s:.3g}" for s in sig),
                      f"{p['gamma']:g}", f"{r['fid']:.3f}",
                      f"{1e3 * r['kid_mean']:.2f} ± {1e3 * r['kid_std']:.2f}" if "kid_mean" in r else "—",
                      f"{r['inception_score_mean']:.3f}" if "inception_score_mean" in r else "—")
    console.print(table)
    p = rows[0][1]["protocol"]
    sha = lambda s: s[:16] if s else "—"  # noqa: E731
    console.print(f"protocol: {p['images']} images, seeds {p['seeds']} (image i from seed i); "
                  f"reference {p['reference']} (sha256 {sha(p['reference_sha256'])}…, {p['reference_images'] or '?'} images); "
                  f"detector {p['detector_weights']} (sha256 {sha(p['detector_sha256'])}…); apctl {p['apctl_version']}; "
                  f"{p['processes']} process(es)", soft_wrap=True)
    for name, r in rows:
        p = r["protocol"]
        who = p.get("weights_sha256") or p.get("teacher_fingerprint") or ""
        console.print(f"  {name}: {p['sampler']}, {p['nfe']} NFE, σ = {', '.join(f'{s:g}' for s in p['sigmas'])}; "
                      f"weights {sha(who)}…; features {p['feature_cache']}", soft_wrap=True)
    for note in dict.fromkeys(n for _, r in rows for n in r["notes"]):
        console.print(f"note: {note}", soft_wrap=True)
