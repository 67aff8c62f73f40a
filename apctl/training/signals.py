"""Stopping a training loop cleanly on SIGTERM (a cluster's pre-emption notice) and SIGINT (Ctrl-C).

`StopSignals` is a context manager around the loop. Its handlers only record the first signal; the
loop asks `requested()` once per step, after the step in progress has completed, saves a checkpoint
and stops. A second signal does not wait: it raises `RunStopped` wherever the loop is (a checkpoint
being written is abandoned, its temporary file removed; the previous one stays). On exit the
previous handlers are restored.

Before the loop there is no step to checkpoint: `StopAtOnce` (around the Analytic-Precond statistics
and the probe's teacher-ODE reference) turns the first SIGTERM / SIGINT into `RunStopped` at once,
with one line; the statistics cache is only ever written whole, so a re-run starts that phase again.

Under torchrun every rank must stop at the same step, or the ranks would wait for each other in the
next all-reduce for ever. `requested()` therefore takes the maximum over the ranks: every step when
the ranks talk over CPU tensors (gloo; a few microseconds), every `sync_every` steps otherwise (a
device all-reduce read on the host would stall the GPU pipeline every step).
"""

from __future__ import annotations

import signal
import threading

import torch

from apctl.errors import RunStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by `signum`: 128 + its number (SIGTERM 143, SIGINT 130)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _Handlers:
    """A context that sends SIGTERM / SIGINT to `self._handle` (each subclass defines it) and restores the
    previous handlers on exit."""

    previous: dict[int, object]

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():   # Python delivers signals to the main thread only
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class StopSignals(_Handlers):
    """Record SIGTERM / SIGINT while the loop runs; see the module docstring."""

    def __init__(self, device: torch.device | None = None, sync_every: int = 1):
        self.signum = 0
        self.device = device or torch.device("cpu")
        self.sync_every = max(int(sync_every), 1)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise RunStopped(f"second {signal_name(signum)}: stopped at once, without a checkpoint; "
                             "re-run the same command to resume from the last one", exit_code(signum))
        self.signum = signum

    def requested(self, step: int) -> int:
        """The signal every rank agrees to stop on after `step` (0: go on)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        if self.device.type != "cpu" and step % self.sync_every:
            return 0
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class StopAtOnce(_Handlers):
    """Outside the loop: the first SIGTERM / SIGINT raises `RunStopped` naming `phase` (see the module
    docstring). Previous handlers are restored on exit."""

    def __init__(self, phase: str):
        self.phase = phase

    def _handle(self, signum, frame) -> None:
        raise RunStopped(f"{signal_name(signum)} during {self.phase}: stopped before training went on; "
                         "re-run the same command to start again (from the last checkpoint, if any)", exit_code(signum))
