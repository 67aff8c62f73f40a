"""`apctl teacher …`: bring a diffusion teacher into apctl's own format."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from apctl.cli.options import DataOpt, OutputAliasOpt, SetOpt, ThreadsOpt, out_path, resolve_config
from apctl.errors import ApctlError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train a diffusion teacher (EDM's loss) or import one (EDM pickles, apctl safetensors) into apctl's format.",
)


@app.callback()
def _teacher() -> None:
    """Train a diffusion teacher, or import one into apctl's safetensors + JSON format."""


@app.command("train")
def train_teacher(
    preset: str = typer.Option("digits-teacher", "--preset", "-p",
                               help="A teacher-training preset (objective.kind = 'edm'), by name or .toml path."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<run.name>)."),
    overrides: Optional[list[str]] = SetOpt,
    data: Optional[Path] = DataOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan (data found or not, device, "
                                                           "network size, warnings) and exit; trains nothing."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Train an EDM denoiser on a data set (resumes when re-run) and write it as a teacher.

    EDM's loss (ln σ ~ N(−1.2, 1.2²), weight (σ² + σ_d²)/(σ·σ_d)²) on the same engine as `apctl
    distill`: EMA, checkpoints, resume by re-running, torchrun, fp16/bf16. The evaluation EMA is
    written as RUN/teacher.safetensors (+ .json with its fingerprint), ready for
    `apctl distill --teacher RUN/teacher.safetensors`; RUN/samples.png shows EDM's 35-NFE sampler."""
    from apctl.cli.distill import run_training

    cfg, preset_path = resolve_config(preset, overrides, None, data, threads)
    if cfg.objective.kind != "edm":
        raise ApctlError(f"preset {preset!r} distils (objective.kind = {cfg.objective.kind!r}); "
                         "a teacher-training preset has objective.kind = 'edm' (e.g. digits-teacher)")
    run_training("teacher train", cfg, preset, preset_path, out, dry_run)


@app.command("import")
def import_teacher(
    file: Path = typer.Argument(..., help="Teacher to import: an NVlabs/edm network pickle (*.pkl), OpenAI's "
                                          "edm_imagenet64_ema.pt (CTM's ImageNet teacher), or an apctl teacher "
                                          "(*.safetensors with its *.json).", metavar="FILE"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Weights to write (*.safetensors; default teacher.safetensors); the "
                                            "description goes next to it as *.json."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    output_alias: Optional[Path] = OutputAliasOpt,
) -> None:
    """Read FILE without executing anything in it, rebuild and check the network, write --out and its JSON."""
    from rich.console import Console
    from rich.table import Table

    from apctl.teachers.apctl_format import save_teacher, teacher_paths
    from apctl.teachers.importers import load_teacher

    output = out_path(out, output_alias, Path("teacher.safetensors"))
    if output.suffix not in (".safetensors", ""):
        raise ApctlError(f"--out must end in .safetensors, got {output}")
    weights_path, json_path = teacher_paths(output)
    existing = [str(p) for p in (weights_path, json_path) if p.exists()]
    if existing and not force:
        raise ApctlError(f"{' and '.join(existing)} already exist; pass --force to overwrite")
    if not file.exists():
        raise ApctlError(f"{file} does not exist")
    try:
        same_file = file.resolve() in (weights_path.resolve(), json_path.resolve())
    except OSError:
        same_file = False
    if same_file:
        raise ApctlError(f"{file} is also the output; choose another --out")

    bundle = load_teacher(file)
    written = save_teacher(bundle, weights_path)

    console = Console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("source", f"{file} ({bundle.source_format})")
    table.add_row("class", bundle.arch["class_name"] + (f" / {bundle.arch['init_kwargs'].get('model_type')}"
                                                        if bundle.arch["init_kwargs"].get("model_type") else ""))
    table.add_row("parameters", f"{bundle.parameter_count:,}")
    table.add_row("fingerprint", bundle.fingerprint)
    if bundle.source_sha256:
        table.add_row("source sha256", bundle.source_sha256)
    if bundle.module_src_sha256:
        table.add_row("embedded source", ", ".join(f"{name} {digest[:12]}" for name, digest
                                                  in sorted(bundle.module_src_sha256.items()))
                      + "  (hashed, never executed)")
    table.add_row("wrote", f"{written[0]}\n{written[1]}")
    console.print(table)
