"""A metric over training: every EMA snapshot of one or more runs, and the iterations each run needs.

For each run (`<run>/snapshots/ckpt-*.json`, `apctl.training.snapshots`) and each NFE, one point per
snapshot: its step and

* metric "fid":   FID of the snapshot's EMA under EDM's protocol (`apctl.metrics.model_fid`; features
                  cached in `<run>/fid-cache/`, so a snapshot interrupted mid-way resumes);
* metric "align": alignment RMS of its NFE-step samples with the teacher's ODE on the run's fixed
                  probe noise (`eval.n_samples`, `eval.seed`, `eval.teacher_steps`; `apctl.metrics.alignment`).

A finished point is kept in `<run>/curves/<settings hash>/step-NNNNNNN-nfeK.json`, so re-running the
command evaluates only what is missing. Both metrics are lower-is-better: the iterations a run needs
to reach a target value are the step of its first snapshot at or below it, and the ratio of run k
is iterations(first run) / iterations(run k) — the paper's "2–3× fewer iterations" when the first
run is the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from apctl.errors import ApctlError
from apctl.files import atomic_write
from apctl.metrics.feature_cache import protocol_hash
from apctl.training.snapshots import list_snapshots

METRICS = ("fid", "align")


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short names for the runs: their folder names, or their paths where folder names repeat."""
    names = [Path(r).name for r in run_dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, run_dirs)]


def _point_path(run_dir: Path, settings: dict, step: int, nfe: int) -> Path:
    return Path(run_dir) / "curves" / protocol_hash(settings) / f"step-{step:07d}-nfe{nfe}.json"


def curve_points(run_dirs: Sequence[Path], metric: str, nfes: Sequence[int], *, device="cpu", gamma: float = 0.0,
                 schedule: str | None = None, reference: dict | None = None, detector=None, n: int | None = None,
                 batch_size: int = 64, progress: Callable[[str], Callable[[int, int], None]] | None = None,
                 on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """[{'run', 'label', 'step', 'nfe', 'value'}] for every snapshot of every run (run, then step, then NFE order).

    `reference`, `detector` and `n` (default: each run's eval.fid_samples) are for metric 'fid'.
    Every run's snapshots are listed before anything is evaluated (one-line error for a run without)."""
    from apctl.metrics.model_fid import fid_image_count, student_rows
    from apctl.sampling import SigmaPolicy
    from apctl.training.trained import load_trained_student

    if metric not in METRICS:
        raise ApctlError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "fid" and (reference is None or detector is None):
        raise ApctlError("the FID curve needs reference statistics (--fid REF.npz)")
    snapshots = {Path(r): list_snapshots(Path(r)) for r in run_dirs}
    points = []
    for (run_dir, snaps), label in zip(snapshots.items(), run_labels(list(snapshots))):
        probe = None
        for snap in snaps:
            trained = load_trained_student(snap, "ema", device)
            e = trained.cfg.eval
            policy = SigmaPolicy.of(e, schedule)
            settings = {"metric": metric, "gamma": gamma, "schedule": policy.describe()}
            if metric == "fid":
                settings.update(n=fid_image_count(e, n), reference_sha256=reference["sha256"],
                                detector=detector.path)
            else:
                settings.update(n=e.n_samples, seed=e.seed, teacher_steps=e.teacher_steps)
            for nfe in nfes:
                path = _point_path(run_dir, settings, trained.checkpoint.step, nfe)
                if path.is_file():
                    value = json.loads(path.read_text())["value"]
                elif metric == "fid":
                    row = student_rows(trained, [nfe], settings["n"], reference, detector, gamma=gamma,
                                       schedule=schedule, batch_size=batch_size,
                                       progress=(lambda what: progress(f"{label} step {trained.checkpoint.step} {what}"))
                                       if progress else None)[0]
                    value = row["fid"]
                    atomic_write(path, json.dumps({"step": trained.checkpoint.step, "nfe": nfe, "value": value,
                                                   "settings": settings, "protocol": row["protocol"]}, indent=1))
                else:
                    if probe is None:
                        from apctl.metrics.alignment import run_probe

                        probe = run_probe(trained, device)
                    from apctl.metrics.evaluation import measure

                    r = measure(probe, trained.net, trained.precond, trained.grid, [nfe], gamma=gamma,
                                policy=policy)[f"nfe={nfe}"]
                    value = r["alignment_rms"]
                    atomic_write(path, json.dumps({"step": trained.checkpoint.step, "nfe": nfe, "value": value,
                                                   "settings": settings, "sigmas": r["sigmas"]}, indent=1))
                point = {"run": str(run_dir), "label": label, "step": trained.checkpoint.step, "nfe": nfe,
                         "value": value}
                points.append(point)
                if on_point is not None:
                    on_point(point)
    return points


def iterations_to_target(points: list[dict], target: float) -> dict[str, dict[int, dict]]:
    """{label: {nfe: {'iterations': first step with value ≤ target or None, 'ratio': iterations of the first
    run / this run's (None unless both reach it)}}}."""
    out: dict[str, dict[int, dict]] = {}
    for p in sorted(points, key=lambda p: p["step"]):
        slot = out.setdefault(p["label"], {}).setdefault(p["nfe"], {"iterations": None, "ratio": None})
        if slot["iterations"] is None and p["value"] <= target:
            slot["iterations"] = p["step"]
    labels = list(dict.fromkeys(p["label"] for p in points))
    baseline = out.get(labels[0], {}) if labels else {}
    for label in labels:
        for nfe, slot in out[label].items():
            base = baseline.get(nfe, {}).get("iterations")
            if base is not None and slot["iterations"]:
                slot["ratio"] = base / slot["iterations"]
    return out
