"""The 2-step sampler's intermediate level: every grid level σ_m in 80 → σ_m → σ_min, per trained student.

Consistency models tune the middle time of their 2-step sampler (Song et al. 2023 run a ternary search on
FID over the 40-level grid; openai/consistency_models samples ImageNet-64 at `--ts 0,22,39`). For a
Gaussian-mixture teacher the whole curve is cheap, so this script measures it: for each run directory and
each inner level of the run's training grid (up to `--max-level`), the deterministic (γ = 0) 2-step
sample from the probe's noise and its alignment RMS, sliced W2 and fraction beyond 3σ of a mode
(`apctl.metrics.two_step_level.level_rows`, the rows of `apctl eval level`), one JSON row each; then, per
level, the mean over the runs, and the level with the lowest mean fraction.

Choose a level on one probe and report it on another: `--probe-seed` should differ from the runs'
`eval.seed` (12345), which `bench/toy2d_default.py` and `apctl eval` use.

    python bench/toy2d_default.py --seeds 0 1 2 3 --keep runs/levels     # train the students
    python bench/toy2d_two_step_level.py runs/levels/toy2d-seed{0,1,2,3} --probe-seed 777 --n 32768
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def level_rows(run_dir: Path, probe_seed: int, n: int, max_level: float) -> list[dict]:
    """One row per inner grid level up to `max_level`: the run's final evaluation-EMA student sampled on
    80 → level → σ_min from a probe of `n` noises drawn with `probe_seed` (`apctl eval level`'s rows)."""
    import torch

    from apctl.metrics.alignment import run_probe
    from apctl.metrics.two_step_level import inner_levels, level_rows as rows_of
    from apctl.training.trained import load_trained_student

    torch.set_num_threads(1)
    trained = load_trained_student(run_dir)
    probe = run_probe(trained, n=n, seed=probe_seed)
    rows = rows_of(probe, trained.net, trained.precond, trained.grid, inner_levels(trained.grid, hi=max_level))
    return [{"run": str(run_dir)} | r | {"teacher_ode_beyond_3sigma": probe.beyond_3sigma.get("teacher_ode")} for r in rows]


def summarise(rows: list[dict]) -> list[dict]:
    """Per level (decreasing): the mean fraction and RMS over the runs, and how many runs it is measured on."""
    by_level = defaultdict(list)
    for row in rows:
        by_level[row["level"]].append(row)
    return [{"level": level, "runs": len(rs), "mean_beyond_3sigma": sum(r["beyond_3sigma"] for r in rs) / len(rs),
             "mean_rms": sum(r["alignment_rms"] for r in rs) / len(rs)} for level, rs in sorted(by_level.items(), reverse=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories of trained Gaussian-mixture students")
    parser.add_argument("--probe-seed", type=int, default=777, help="the probe's noise seed (not the runs' eval.seed)")
    parser.add_argument("--n", type=int, default=32768, help="probe noises (a 2%% fraction then has a standard error of 0.08%%)")
    parser.add_argument("--max-level", type=float, default=10.0, help="only inner levels up to this σ")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        for row in level_rows(run, args.probe_seed, args.n, args.max_level):
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = summarise(rows)
    for row in summary:
        print(json.dumps(dict(row, summary=True)), flush=True)
    best = min(summary, key=lambda r: r["mean_beyond_3sigma"])
    print(json.dumps({"best_level": best["level"], "mean_beyond_3sigma": best["mean_beyond_3sigma"]}), flush=True)


if __name__ == "__main__":
    main()
