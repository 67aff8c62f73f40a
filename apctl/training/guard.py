"""The guarded step: what a non-finite loss or gradient does to a run.

    taken(k)  = loss and ‖∇‖ finite on every rank (one all-reduce; GradScaler's rule under fp16,
                applied to fp32 and bf16 too). A step not taken leaves θ, the optimizer state, θ⁻
                and the EMA as they were, and logs skipped = 1.
    stop      after training.max_skipped_steps consecutive steps not taken: one line naming the step.
    save      refused (one line) if any tensor of the checkpoint is non-finite, so a checkpoint on
              disk always holds finite tensors and the last good ones are never pruned for bad ones.
    log       non-finite values become null in metrics.jsonl, named under "nonfinite", so every line
              parses as strict JSON.

Deciding whether to take a step is the step's one host read (as GradScaler.step reads found_inf):
torch's optimizers cannot skip on a device flag.
"""

from __future__ import annotations

import math

import torch

from apctl.errors import ApctlError
from apctl.training import distributed


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether the step may be taken: loss and gradient norm finite on every rank."""
    finite = (torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach())).to(torch.int32)
    return bool(distributed.min_over_ranks(finite))


class ConsecutiveSkips:
    """Counts steps not taken in a row; `exhausted` once `limit` are reached, and `error()` says so."""

    def __init__(self, limit: int):
        self.limit, self.count, self.first, self.step = limit, 0, 0, 0

    def record(self, step: int, skipped: bool) -> None:
        """`step` = the number of steps done, the skipped one included."""
        self.step = step
        if not skipped:
            self.count = 0
            return
        if self.count == 0:
            self.first = step
        self.count += 1

    @property
    def exhausted(self) -> bool:
        return self.count >= self.limit

    def error(self) -> ApctlError:
        return ApctlError(f"training stopped at step {self.step}: {self.count} steps in a row (from step {self.first}) "
                          "had a non-finite loss or gradient and were skipped (training.max_skipped_steps); "
                          "the checkpoints on disk are finite: lower training.lr or add training.lr_warmup")


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or ±inf (read once per checkpoint, which
    copies every tensor to the host anyway)."""
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(tensors: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to checkpoint non-finite state (one line naming up to three tensors)."""
    bad = nonfinite_names(tensors)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ApctlError(f"not writing the checkpoint of step {step}: {', '.join(bad[:3])}{more} hold non-finite "
                         "values; the earlier checkpoints are kept")


def json_safe(logs: dict) -> dict:
    """The logs with each non-finite float as None and their keys listed under "nonfinite"."""
    bad = [k for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return dict(logs)
    return dict({k: (None if k in bad else v) for k, v in logs.items()}, nonfinite=bad)
