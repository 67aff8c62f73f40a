"""Entry point: `apctl distill | sample | eval | precond … | teacher …`."""

from __future__ import annotations

import os
import sys
import warnings

import typer

from apctl.cli import distill, evaluate, precond, sample, teacher
from apctl.errors import ApctlError

# torch.func imports a module that warns about torch.jit.script at import time; it is not ours to fix.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

app = typer.Typer(
    name="apctl",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Distill an EDM diffusion teacher into a few-step consistency student, with Analytic-Precond.",
)


@app.callback()
def _root() -> None:
    """Distill an EDM diffusion teacher into a 1–4 step student (CTM / CD objectives), sample it,
    evaluate it against the teacher, and inspect the Analytic-Precond coefficients.

    Start with `apctl distill` (the offline toy2d preset) and `apctl eval --ckpt runs/toy2d`.
    """


app.command("distill")(distill.distill)
app.command("sample")(sample.sample)
app.command("eval")(evaluate.evaluate)
app.add_typer(precond.app, name="precond")
app.add_typer(teacher.app, name="teacher")


def main() -> None:
    """Run the CLI; user errors become one red line on stderr and exit code 1, without a traceback."""
    try:
        app()
    except ApctlError as exc:
        if os.environ.get("RANK", "0") != "0":
            sys.exit(1)  # under torchrun every rank meets the same error; rank 0 reports it
        from apctl.cli.ui import err_console

        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; re-run the same command to resume from the last checkpoint\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
