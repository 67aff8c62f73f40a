"""Does Analytic-Precond accelerate CTM distillation? Vanilla CTM preconditioning against Analytic-Precond.

For each preset (default: toy2d and digits) and each seed, two runs that differ only in
`precond.kind` ("ctm" = CTM's (s/t, 1 − s/t), "analytic" = Analytic-Precond, backward form), same
seed, same budget. Every `eval_every` iterations the evaluation-EMA student's 1- and 2-step
trajectory alignment with the teacher's ODE is logged (same noise for every run).

Printed figures, per preset:
  * final 1- and 2-step alignment RMS (mean ± std over seeds) of both runs;
  * the speed-up: iterations vanilla takes to reach its final 2-step error, divided by the first
    logged iteration at which Analytic-Precond's seed-mean curve reaches that error (> 1 = faster);
  * the same ratio for 1 step, and per seed (each seed's AP run against the same seed's vanilla run).
For the network-teacher setting (digits-net, with FID and the CD pair) see bench/acceleration_network.py,
which uses `speedup` from here.
The paper reports 2–3× at 2 steps and ≈ 1× at 1 step on CIFAR-10 / ImageNet-64.

    python bench/acceleration.py                       # both presets, 3 seeds, 2 parallel jobs
    python bench/acceleration.py --presets toy2d --seeds 0 1 2 --jobs 2 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


def one_run(args: tuple[str, str, int, str, list[str]]) -> dict:
    preset, kind, seed, out, extra = args
    import torch

    torch.set_num_threads(1)
    from apctl.presets import load_config
    from apctl.training.run import alignment_probe, prepare, train

    overrides = [f'precond.kind="{kind}"', f"run.seed={seed}", "run.threads=1"] + extra
    cfg, _ = load_config(preset, overrides)
    run_dir = Path(out) / f"{preset}-{kind}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    run = prepare(cfg, run_dir)
    train(run, None, alignment_probe(run))
    curve = [(h["step"], h["align_nfe1"], h["align_nfe2"]) for h in run.history if "align_nfe2" in h]
    return {"preset": preset, "kind": kind, "seed": seed, "curve": curve, "seconds": time.perf_counter() - started}


def steps_to_reach(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first logged step whose value is ≤ `level`, or None."""
    return next((step for step, value in curve if value <= level), None)


def speedup(steps: list[int], baseline: list[float], candidate: list[float]) -> dict:
    """How many times fewer iterations `candidate` needs to reach `baseline`'s final value.

    target = baseline[-1]; baseline_steps / candidate_steps are the first logged steps at which each
    curve is ≤ target (so the resolution is the logging interval). ratio > 1: the candidate is faster;
    None: the candidate never reaches the target; inf: it is there at step 0 and the baseline is not.
    """
    target = baseline[-1]
    base = steps_to_reach(list(zip(steps, baseline)), target)
    cand = steps_to_reach(list(zip(steps, candidate)), target)
    if cand is None:
        ratio = None
    elif cand == 0:
        ratio = 1.0 if base == 0 else float("inf")
    else:
        ratio = base / cand
    return {"target": target, "baseline_steps": base, "candidate_steps": cand, "ratio": ratio}


def format_ratio(ratio: float | None) -> str:
    return "never reached" if ratio is None else f"{ratio:.2f}×"


def summarise(results: list[dict], preset: str) -> dict:
    by_kind = {k: sorted((r for r in results if r["preset"] == preset and r["kind"] == k), key=lambda r: r["seed"])
               for k in ("ctm", "analytic")}
    steps = [s for s, _, _ in by_kind["ctm"][0]["curve"]]
    summary = {"preset": preset, "seeds": len(by_kind["ctm"]), "steps": steps}
    for col, name in ((1, "nfe1"), (2, "nfe2")):
        mean = {k: [statistics.mean(r["curve"][i][col] for r in runs) for i in range(len(steps))]
                for k, runs in by_kind.items()}
        finals = {k: [r["curve"][-1][col] for r in runs] for k, runs in by_kind.items()}
        ratio = speedup(steps, mean["ctm"], mean["analytic"])
        per_seed = [speedup(steps, [c[col] for c in a["curve"]], [c[col] for c in b["curve"]])["ratio"]
                    for a, b in zip(by_kind["ctm"], by_kind["analytic"])]
        summary[name] = {
            "final_ctm": (statistics.mean(finals["ctm"]), statistics.pstdev(finals["ctm"])),
            "final_analytic": (statistics.mean(finals["analytic"]), statistics.pstdev(finals["analytic"])),
            "curve_ctm": mean["ctm"], "curve_analytic": mean["analytic"],
            "vanilla_steps": ratio["baseline_steps"], "analytic_steps": ratio["candidate_steps"],
            "speedup": ratio["ratio"], "speedup_per_seed": per_seed,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["toy2d", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra preset overrides for every run, e.g. training.iterations=2000")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [(p, k, s, args.out, args.overrides) for p in args.presets for s in args.seeds for k in ("ctm", "analytic")]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(one_run, jobs, chunksize=1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summaries = [summarise(results, p) for p in args.presets]
    Path(args.out, "acceleration.json").write_text(json.dumps({"runs": results, "summaries": summaries}, indent=1))

    print(f"# bench/acceleration.py — {len(jobs)} runs, {time.perf_counter() - started:.0f} s wall")
    print("preset | NFE | final RMS, CTM precond | final RMS, Analytic-Precond | its vanilla → its AP to vanilla's final | speed-up")
    for s in summaries:
        for name in ("nfe1", "nfe2"):
            r = s[name]
            speed = format_ratio(r["speedup"]) + " (per seed: " + ", ".join(map(format_ratio, r["speedup_per_seed"])) + ")"
            print(f"{s['preset']} | {name[-1]} | {r['final_ctm'][0]:.4f} ± {r['final_ctm'][1]:.4f} | "
                  f"{r['final_analytic'][0]:.4f} ± {r['final_analytic'][1]:.4f} | "
                  f"{r['vanilla_steps']} → {r['analytic_steps']} | {speed}")
        print(f"{s['preset']} curves (step: CTM / AP, 2-step RMS): " + ", ".join(
            f"{st}: {a:.3f}/{b:.3f}" for st, a, b in zip(s["steps"], s["nfe2"]["curve_ctm"], s["nfe2"]["curve_analytic"])))


if __name__ == "__main__":
    sys.exit(main())
