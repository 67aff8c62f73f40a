"""Console output shared by the commands: one rich console, progress bars, the distill reporter."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


class ProgressCallback:
    """progress(done, total) for engine loops, drawn as one rich bar."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=total, info="")
        self.bar.update(self.task, completed=done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class DistillReporter:
    """Draws the training bar (loss and it/s) and prints the engine's messages above it."""

    def __init__(self, phase: str = "distill"):
        self.phase = phase
        self.bar = None
        self.task = None
        self.stats = ProgressCallback("teacher statistics")

    def message(self, text: str) -> None:
        (self.bar.console if self.bar else console).print(text)

    def statistics_progress(self, done: int, total: int) -> None:
        self.stats(done, total)

    def start(self, start_step: int, total_steps: int) -> None:
        self.bar = progress_bar()
        self.bar.start()
        self.task = self.bar.add_task(self.phase, total=total_steps, completed=start_step, info="")

    def step(self, step: int, logs: dict) -> None:
        info = ""
        if "loss" in logs:
            info = f"loss {logs['loss']:.4g}"
            if "it_per_s" in logs:
                info += f" · {logs['it_per_s']:.1f} it/s"
            if "align_nfe2" in logs:
                info += f" · align@2 {logs['align_nfe2']:.4f}"
        self.bar.update(self.task, completed=step, info=info)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
