"""Console output shared by the commands: one rich console, progress, the training reporter.

On a terminal, progress is a rich bar. Anywhere else (a log file, `nohup`, SLURM) a bar would be
printed once, when its phase ends, so progress is instead a plain timestamped line every
$APCTL_LOG_SECONDS seconds (default 30) and at the end of each phase:

    2026-11-29 05:12:03  distill  1200/4000 (30%)  12.3 it/s  ETA 0:03:48  loss 0.0412 · align@2 0.0520
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def log_interval() -> float:
    """Seconds between two plain progress lines ($APCTL_LOG_SECONDS, default 30)."""
    try:
        return max(float(os.environ.get("APCTL_LOG_SECONDS", "30")), 0.0)
    except ValueError:
        return 30.0


def stamp() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


class PhaseProgress:
    """One phase's progress (done of total, an info text): a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, description: str, total: int, done: int = 0):
        self.description, self.total, self.start_done = description, total, done
        self.plain = not console.is_terminal
        self.started = self.last_line = time.monotonic()
        self.done, self.info = done, ""
        if self.plain:
            self.bar = None
        else:
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, completed=done, info="")

    def print(self, text: str) -> None:
        if self.plain:
            console.print(f"{stamp()}  {text}", soft_wrap=True)
        else:
            self.bar.console.print(text)

    def update(self, done: int, info: str = "") -> None:
        self.done, self.info = done, info
        if not self.plain:
            self.bar.update(self.task, completed=done, info=info)
        elif time.monotonic() - self.last_line >= log_interval() or done >= self.total:
            self._line()

    def _line(self) -> None:
        self.last_line = now = time.monotonic()
        rate = (self.done - self.start_done) / max(now - self.started, 1e-9)
        eta = timedelta(seconds=round((self.total - self.done) / rate)) if rate > 0 else "?"
        pct = 100 * self.done / max(self.total, 1)
        console.print(f"{stamp()}  {self.description}  {self.done}/{self.total} ({pct:.0f}%)  {rate:.3g}/s  ETA {eta}"
                      + (f"  {self.info}" if self.info else ""), soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.plain and self.done < self.total:
            self._line()                       # where it stopped, if it did not finish
        self.plain = False


class ProgressCallback:
    """progress(done, total) for engine loops (statistics, teacher ODE references)."""

    def __init__(self, description: str):
        self.description = description
        self.phase: PhaseProgress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.phase is None:
            self.phase = PhaseProgress(self.description, total)
        self.phase.update(done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.phase is not None:
            self.phase.close()
            self.phase = None


class CountProgress:
    """progress(done, total) for work that resumes part-way (cached FID features): the first call sets the
    starting point, so the rate (`unit`/s, shown beside the bar) and the ETA count only this process's work."""

    def __init__(self, description: str, unit: str = "img"):
        self.description, self.unit = description, unit
        self.phase: PhaseProgress | None = None
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        if self.finished:
            return
        if self.phase is None:
            self.phase = PhaseProgress(self.description, total, done)
        elapsed = time.monotonic() - self.phase.started
        rate = (done - self.phase.start_done) / elapsed if elapsed > 0 else 0.0
        # plain lines state the rate themselves; the bar gets it beside the count
        shown = done > self.phase.start_done and not self.phase.plain
        self.phase.update(done, f"{rate:.3g} {self.unit}/s" if shown else "")
        if done >= total:
            self.finished = True
            self.close()

    def close(self) -> None:
        if self.phase is not None:
            self.phase.close()
            self.phase = None


class TrainingReporter:
    """The reporter of `apctl distill` and `apctl teacher train`: progress with loss (averaged over the logging interval), it/s and the
    alignment probe; the engine's messages printed above it (timestamped off a terminal)."""

    def __init__(self, phase: str = "distill"):
        self.phase_name = phase
        self.phase: PhaseProgress | None = None
        self.stats = ProgressCallback("teacher statistics")

    def message(self, text: str) -> None:
        if self.phase is not None:
            self.phase.print(text)
        elif console.is_terminal:
            console.print(text)
        else:
            console.print(f"{stamp()}  {text}", soft_wrap=True)

    def statistics_progress(self, done: int, total: int) -> None:
        self.stats(done, total)

    def start(self, start_step: int, total_steps: int, terms: tuple[str, ...]) -> None:
        self.phase = PhaseProgress(self.phase_name, total_steps, start_step)
        self.terms = terms

    def step(self, step: int, logs: dict) -> None:
        info = " · ".join(f"{key} {logs[key]:.4g}" for key in self.terms if key in logs)
        if info and "align_nfe2" in logs:
            info += f" · align@2 {logs['align_nfe2']:.4f}"
        if info and "beyond3_nfe2" in logs:     # a Gaussian-mixture teacher: 2-step samples off every mode
            info += f" · beyond 3σ@2 {logs['beyond3_nfe2']:.1%}"
        self.phase.update(step, info)

    def finish(self) -> None:
        """Close the progress display (idempotent; also a statistics bar cut short by an error)."""
        if self.phase is not None:
            self.phase.close()
            self.phase = None
        self.stats.close()
