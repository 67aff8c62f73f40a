"""Torch threads on the CPU presets: one thread against two, interleaved in one process, as a ratio.

The thread policy (apctl/threads.py) runs networks under 10M parameters on one CPU thread. This
measures what that buys on the CPU presets, with reduced sizes so the whole script takes a few minutes:

* `precond compute --preset digits`: the Analytic-Precond statistics of the exact digits teacher
  (what `apctl precond compute` runs), with n_points and n_samples cut down (--points, --samples);
* `distill --preset digits`, `digits-img` and `digits-net`: training steps (`train_step`, the
  function the loop calls), timed after a warm-up, statistics replaced by CTM's closed form (the
  step costs the same; bench/throughput.py).

Each workload runs --repeats times with 1 and 2 threads alternately (so a change in the machine's
load hits both); the figure is the median time of each and their ratio. The load average of the
machine is printed with the result: on a shared machine it decides how much a second thread costs.

    OMP_NUM_THREADS= python bench/threads.py        # a few minutes on 2 idle cores; longer under load
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def statistics_seconds(threads: int, points: int, samples: int) -> float:
    """Wall time of `apctl precond compute --preset digits` (reduced) at `threads` threads."""
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.preconditioning.build import compute_statistics
    from apctl.presets import load_config
    from apctl.teachers import build_teacher

    torch.set_num_threads(threads)
    cfg, _ = load_config("digits", [f"precond.statistics.n_points={points}", f"precond.statistics.n_samples={samples}"])
    data = load_training_data(cfg.data)
    teacher = build_teacher(cfg.teacher, data)
    start = time.perf_counter()
    compute_statistics(cfg.precond.statistics, teacher, build_data_source(cfg.data, teacher, data))
    return time.perf_counter() - start


def step_seconds(preset: str, threads: int, steps: int, warmup: int) -> float:
    """Seconds per training step of `preset` at `threads` threads (`prepare` sets them from run.threads)."""
    from apctl.presets import load_config
    from apctl.training.run import prepare
    from apctl.training.step import train_step

    cfg, _ = load_config(preset, ['precond.kind="ctm"', "training.eval_every=0", f"run.threads={threads}"])
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(cfg, tmp)
        per_rank = cfg.training.batch_size
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            train_step(run, step, run.student, 0, per_rank)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--points", type=int, default=12, help="λ-points of the statistics (preset: 120)")
    parser.add_argument("--samples", type=int, default=256, help="samples of the statistics (preset: 4096)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["digits", "digits-img", "digits-net"])
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set; torch.set_num_threads overrides it here")
    load_before = os.getloadavg()[0]
    workloads = {f"precond compute --preset digits ({args.points} points × {args.samples} samples), s":
                 lambda n: statistics_seconds(n, args.points, args.samples)}
    for preset in args.presets:
        workloads[f"distill --preset {preset}, s/step"] = lambda n, p=preset: step_seconds(p, n, args.steps, args.warmup)
    print(f"# bench/threads.py: {os.cpu_count()} CPUs, load average {load_before:.1f}, {args.repeats} repeats "
          "(1 and 2 threads alternately), medians")
    print("workload | 1 thread | 2 threads | 2 threads / 1 thread")
    for name, run in workloads.items():
        times = {1: [], 2: []}
        for _ in range(args.repeats):
            for n in (1, 2):
                times[n].append(run(n))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(f"{name} | {one:.4g} | {two:.4g} | {two / one:.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
