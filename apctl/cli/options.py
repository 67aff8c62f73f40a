"""Options shared by several commands, and turning them into one config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

PresetOpt = typer.Option("toy2d", "--preset", "-p",
                         help="Preset name (see presets/) or a path to a .toml file.")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="Override any preset key, e.g. --set training.lr=1e-4 (repeatable; values read as TOML).")
TeacherOpt = typer.Option(None, "--teacher", metavar="FILE",
                          help="Teacher file: an EDM .pkl, OpenAI's edm_imagenet64_ema.pt, or an apctl .safetensors.")
DeviceOpt = typer.Option("auto", "--device",
                         help="Where to compute: auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
DataOpt = typer.Option(None, "--data", metavar="PATH",
                       help="Data set: a CIFAR-10 archive or folder, an EDM dataset zip/folder, or a folder of images (kind inferred from the path).")


def resolve_config(preset: str, overrides: Optional[list[str]], teacher: Optional[Path] = None,
                   data: Optional[Path] = None):
    """Preset, then --teacher/--data (teacher.kind/file, data.kind/path as plain values), then --set."""
    from apctl.presets import load_config

    # Absolute paths, so that `sample` and `eval` find the files from any working directory.
    paths: dict = {}
    if teacher is not None:
        paths["teacher"] = {"kind": "network", "file": str(teacher.expanduser().absolute())}
    if data is not None:
        from apctl.data import infer_data_kind

        paths["data"] = {"kind": infer_data_kind(data), "path": str(data.expanduser().absolute())}
    return load_config(preset, list(overrides or []), paths)

SigmaSchedule = Literal["karras", "grid"]
SigmaScheduleOpt = typer.Option(None, "--sigma-schedule",
                                help="Default σ list of an NFE-n sample: 'karras' (CTM's exact sampler, e.g. NFE 2 = "
                                     "80 → 2.515 → 0.002) or 'grid' (inner levels snapped to the training grid). "
                                     "Default: the run's eval.sigmas.")

Weights = Literal["ema", "student", "target"]
WeightsOpt = typer.Option("ema", "--weights", help="Which weights: the evaluation EMA, the raw student, or the target θ⁻.")
