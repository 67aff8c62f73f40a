"""`apctl eval curve RUN [RUN …]`: a metric over every EMA snapshot of the runs, as CSV, JSON and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import DeviceOpt, GammaOpt, InceptionWeightsOpt
from apctl.errors import ApctlError


def curve(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Run directories with snapshots (training.snapshot_every > 0); the first is the baseline of the ratios."),
    metric: str = typer.Option("fid", "--metric", help="fid (EDM's protocol; needs --fid) or align (alignment RMS with the teacher's ODE)."),
    nfe: str = typer.Option("1,2", "--nfe", help="Comma-separated NFEs."),
    fid: Optional[Path] = typer.Option(None, "--fid", metavar="REF", help="Reference statistics .npz for --metric fid."),
    count: Optional[int] = typer.Option(None, "--n", metavar="N", min=2, help="FID images per point (default: the run's eval.fid_samples)."),
    target: Optional[float] = typer.Option(None, "--target", help="Report the iterations each run needs to reach this value (first snapshot ≤ target)."),
    out: Path = typer.Option(Path("curve"), "--out", "-o", help="Output folder: curve.csv, curve.json, curve.png."),
    gamma: float = GammaOpt,
    batch: int = typer.Option(64, "--batch", metavar="N", min=1, help="Images per batch (FID)."),
    inception_weights: Optional[Path] = InceptionWeightsOpt,
    device: str = DeviceOpt,
) -> None:
    """A metric against training iterations for every snapshot of one or more runs.

    Evaluates each run's EMA snapshots at each NFE (cached in the run directory: re-running resumes),
    writes OUT/curve.csv, curve.json and curve.png (runs overlaid, one panel per NFE) and, with
    --target, the iterations each run needs to reach the target and their ratio to the first run."""
    from apctl.cli.evaluate import _parse_nfes

    nfes = _parse_nfes(nfe)
    if metric not in ("fid", "align"):
        raise typer.BadParameter(f"must be fid or align, got {metric!r}", param_hint="'--metric'")
    if metric == "fid" and fid is None:
        raise ApctlError("--metric fid needs the reference statistics: --fid REF.npz (make them with `apctl eval ref`)")
    import csv
    import io
    import json

    from apctl.cli.ui import CountProgress, console
    from apctl.curve_plot import plot_curves
    from apctl.files import atomic_write
    from apctl.metrics.curves import curve_points, iterations_to_target
    from apctl.training.run import resolve_device
    from apctl.training.snapshots import list_snapshots

    dev = resolve_device(device, "--device")
    for run in runs:
        list_snapshots(run)                        # a run without snapshots: one line, before any work
    reference = detector = None
    if metric == "fid":
        from apctl.metrics.fid_protocol import reference_record
        from apctl.metrics.inception import load_inception

        reference = reference_record(fid)
        detector = load_inception(inception_weights, dev)

    def shown(point: dict) -> None:
        console.print(f"{point['label']} step {point['step']} NFE {point['nfe']}: {metric} {point['value']:.5g}")

    points = curve_points(runs, metric, nfes, device=dev, gamma=gamma, reference=reference, detector=detector, n=count,
                          batch_size=batch, progress=lambda label: CountProgress(f"FID, {label}"), on_point=shown)
    if not points:
        raise ApctlError("no points: the runs have no snapshots")
    text = io.StringIO()
    writer = csv.DictWriter(text, ["label", "run", "step", "nfe", metric])
    writer.writeheader()
    for p in points:
        writer.writerow({"label": p["label"], "run": p["run"], "step": p["step"], "nfe": p["nfe"], metric: p["value"]})
    atomic_write(out / "curve.csv", text.getvalue())
    reached = iterations_to_target(points, target) if target is not None else None
    report = {"metric": metric, "nfes": nfes, "gamma": gamma, "target": target, "points": points,
              "iterations_to_target": reached,
              "reference": None if reference is None else {"path": reference["path"], "sha256": reference["sha256"]}}
    atomic_write(out / "curve.json", json.dumps(report, indent=1))
    plot_curves(points, out / "curve.png", metric, target)
    console.print(f"{len(points)} points → {out / 'curve.csv'}, {out / 'curve.json'}, {out / 'curve.png'}")
    if reached is not None:
        from rich.table import Table

        table = Table(title=f"iterations to reach {metric} ≤ {target:g} (ratio: first run / this run)")
        for col in ("run", "NFE", "iterations", "ratio"):
            table.add_column(col)
        for label, per_nfe in reached.items():
            for n, slot in sorted(per_nfe.items()):
                table.add_row(label, str(n), "not reached" if slot["iterations"] is None else str(slot["iterations"]),
                              "—" if slot["ratio"] is None else f"{slot['ratio']:.2f}×")
        console.print(table)
