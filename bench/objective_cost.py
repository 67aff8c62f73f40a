"""Training-step cost of whole objectives: each preset's `train_step` against the first preset's, in one
process and on one thread, steps interleaved (A, B, A, B, …) over the same step indices.

What a step costs differs by objective, not by a constant: CTM runs k teacher Heun steps (p(k) ∝ k, up
to K) and four student passes plus the DSM term; ECT one student pass with gradient and one without.
Each preset is prepared as `apctl distill` prepares it (statistics shrunk to 16 levels × 64 samples
where it needs them, no probe: neither is timed), warmed up, then timed step by step; the ratio is
the median over the adjacent (reference, other) pairs of their ratio, robust to another job taking
the CPU for a while.

    OMP_NUM_THREADS=1 python bench/objective_cost.py --presets digits-net-ctm digits-ect
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from step_cost import SHRINK     # the same shrunk statistics, no probe, one thread


def prepared(preset: str, folder: Path):
    from apctl.presets import load_config
    from apctl.training.run import prepare

    cfg, _ = load_config(preset, SHRINK)
    return prepare(cfg, folder / preset)


def step_seconds(run, step: int) -> float:
    from apctl.training.step import train_step

    started = time.perf_counter()
    logs = train_step(run, step, run.student)
    float(logs["loss"])          # the step's work is done (a no-op wait on a CPU)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["digits-net-ctm", "digits-ect"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: prepared(p, Path(tmp)) for p in args.presets}
        for run in runs.values():
            for step in range(args.warmup):
                step_seconds(run, step)
        times: dict[str, list[float]] = {p: [] for p in args.presets}
        for step in range(args.warmup, args.warmup + args.steps):
            for preset, run in runs.items():
                times[preset].append(step_seconds(run, step))
        for run in runs.values():
            run.close()
    reference = args.presets[0]
    print(f"| preset | s/step (median of {args.steps}) | steps/s | step time / {reference}'s (median of pairs) |")
    print("|---|---|---|---|")
    for preset, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, times[reference]))
        median = statistics.median(ts)
        print(f"| {preset} | {median:.3f} | {1 / median:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
