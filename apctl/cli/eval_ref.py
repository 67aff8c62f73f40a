"""`apctl eval ref`: FID reference statistics (EDM's .npz layout) of every image of a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import DataOpt, DeviceOpt, InceptionWeightsOpt, SetOpt
from apctl.errors import ApctlError


def ref(
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz (mu, sigma, num_images[, features])."),
    data: Optional[Path] = DataOpt,
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Take the data set from this preset's [data] section (e.g. digits-img; --data overrides its path)."),
    overrides: Optional[list[str]] = SetOpt,
    batch: int = typer.Option(64, "--batch", metavar="N", min=1, help="Images per Inception batch."),
    kid_images: int = typer.Option(5000, "--kid-images", metavar="N", min=0, help="Also store the pool3 features of this many images (seed-0 draw) for KID; 0: statistics only."),
    inception_weights: Optional[Path] = InceptionWeightsOpt,
    device: str = DeviceOpt,
) -> None:
    """Reference statistics for FID: μ and Σ of the Inception pool3 features of every image.

    Any data set apctl reads (CIFAR-10 archive, EDM zip/folder, image folder; the digits through
    --preset digits-img), as stored: no flips, labels ignored. EDM's layout (mu, sigma), so EDM's
    fid.py reads the file too."""
    if out.suffix != ".npz":
        raise ApctlError(f"--out must end in .npz, got {out}")
    if data is None and preset is None:
        raise typer.BadParameter("give the data set with --data PATH or a preset's with --preset", param_hint="'--data'")
    from apctl.cli.ui import CountProgress, console
    from apctl.data import infer_data_kind, load_image_data
    from apctl.files import file_digest
    from apctl.metrics.inception import load_inception
    from apctl.metrics.reference_stats import dataset_statistics, save_dataset_statistics
    from apctl.training.run import resolve_device

    dev = resolve_device(device, "--device")
    if preset is not None:
        from apctl.cli.options import resolve_config
        from apctl.data.sources import load_training_data

        cfg, _ = resolve_config(preset, overrides, data=data)
        if cfg.data.kind == "teacher":
            raise ApctlError(f"preset {preset!r} draws its data from its teacher (data.kind = 'teacher'); pass --data PATH")
        images = load_training_data(cfg.data)
    else:
        if overrides:
            raise ApctlError("--set needs --preset (the keys it changes live in a preset)")
        images = load_image_data(infer_data_kind(data), data.expanduser(), use_labels=False)
    detector = load_inception(inception_weights, dev)
    console.print(f"{len(images)} images {images.image_shape} from {images.source}; Inception on {dev}, "
                  f"weights {detector.path}", soft_wrap=True)
    stats = dataset_statistics(images.images, detector, batch, kid_images, progress=CountProgress("reference features"))
    save_dataset_statistics(out, stats)
    kid = f", pool3 features of {len(stats['features'])} images for KID" if "features" in stats else ""
    console.print(f"reference statistics of {stats['num_images']} images → {out} (sha256 {file_digest(out)[:16]}…){kid}", soft_wrap=True)
