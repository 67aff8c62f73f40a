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
    rich_markup_mode=None,   # plain help: boolean flags shown as flags (no <bool>), [brackets] in docstrings kept
    help="Distill an EDM diffusion teacher into a few-step consistency student, with Analytic-Precond.",
)


def _print_version(value: bool) -> None:
    if value:
        from apctl import __version__

        typer.echo(f"apctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print apctl's version and exit.")) -> None:
    """Distill an EDM diffusion teacher into a 1–4 step student (CTM / CD objectives), sample it,
    evaluate it against the teacher, and inspect the Analytic-Precond coefficients.

    Start with `apctl distill` (the offline toy2d preset) and `apctl eval --ckpt runs/toy2d`.
    """


app.command("distill")(distill.distill)
app.command("sample")(sample.sample)
app.add_typer(evaluate.app, name="eval")
app.add_typer(precond.app, name="precond")
app.add_typer(teacher.app, name="teacher")


def main() -> None:
    """Run the CLI. User errors (ApctlError, bad flags) are one line on stderr, no traceback:
    exit code 1 for errors in the work, 2 for command-line usage errors, 128 + N for a training run
    stopped by signal N (143 SIGTERM, 130 SIGINT)."""
    from apctl.cli.ui import err_console

    def fail(message: str, code: int) -> None:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same error
            from rich.markup import escape

            err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
        sys.exit(code)

    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored click's) usage errors: bad or missing flags
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail(exc.format_message() + hint, getattr(exc, "exit_code", 2))
    except ApctlError as exc:
        fail(str(exc), getattr(exc, "exit_code", 1))     # RunStopped: 128 + the signal's number
    except (KeyboardInterrupt, typer.Abort):
        from apctl.cli.ui import console

        console.show_cursor(True)      # a progress bar interrupted outside the training loop hid it
        sys.stderr.write("interrupted; re-run the same command to resume from the last checkpoint\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
