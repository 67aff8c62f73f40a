"""The optional TensorBoard sink (training.tensorboard = true): every metrics line also goes to
<run>/tensorboard as scalars under "train/<key>", written by rank 0. metrics.jsonl stays the record;
the sink only mirrors it, so it needs no resume logic (TensorBoard shows the later value of a step
logged twice)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from apctl.errors import ApctlError

NOT_SCALARS = ("step", "time")


def tensorboard_sink_available() -> None:
    """Refuse (one line, before anything is written) when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ApctlError("training.tensorboard = true needs the tensorboard package (pip install tensorboard); "
                         "metrics.jsonl is written either way")


class TensorBoardSink:
    """Writes the numeric, finite values of a metrics line with `writer.add_scalar` (a SummaryWriter
    or anything with add_scalar(tag, value, global_step) and close())."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, logs: dict) -> None:
        step = int(logs["step"])
        for key, value in logs.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(run_dir: Path) -> TensorBoardSink:
    tensorboard_sink_available()
    from torch.utils.tensorboard import SummaryWriter

    return TensorBoardSink(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard")))
