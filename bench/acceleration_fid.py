"""FID over training for an existing `bench/acceleration_network.py` output (digits-net).

`acceleration_network.py` measures alignment RMS every `eval_every` iterations and keeps the run
directories with their checkpoints. FID on this CPU costs ~1–2 s per image (Inception-v3 at 299 px),
so FID "every M iterations" is computed afterwards, here, on every checkpoint the runs kept and at
step 0 (the student initialised from the teacher: teacher weights + zero s-embedding), for the CTM
pair (CTM's coefficients vs Analytic-Precond) and, with `--objectives ctm cd`, the CD pair (CM's
coefficients vs Analytic-Precond; like-for-like at NFE 1 only), at the requested NFEs:

    FID(student_NFE(z_i, y_i), real digits)      reference: all 1,797 real digits
    FID(student_NFE(z_i, y_i), teacher samples)  reference: 1,797 samples of the teacher's EDM sampler
                                                 (18 Karras levels + an Euler step to 0: 35 NFE)

Student samples use one fixed noise z_i ~ N(0, I) (seed `--fid-seed`, classes cycling 0..9) for every
run and step, so differences between runs are not sampling noise in z. Everything is cached in
`<work>/fid/` (reference statistics, one JSON per evaluated point), so an interrupted run resumes.
Printed: a markdown table (mean ± std over seeds, ddof 0) and, per objective and NFE, the iterations
Analytic-Precond needs to reach the baseline's final seed-mean FID against real digits
(`bench/acceleration.py`'s `speedup`, at the checkpoints' resolution).

    OMP_NUM_THREADS=1 python bench/acceleration_fid.py --work /work/bench-out/digits_net --n 256 --nfe 2
    OMP_NUM_THREADS=1 python bench/acceleration_fid.py --work /work/bench-out/digits_net --n 128 --nfe 1 --objectives ctm cd
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acceleration import format_ratio, speedup  # noqa: E402
from acceleration_network import fid_noise, teacher_edm_samples  # noqa: E402

LABEL = {"ctm": "CTM's coefficients", "cm": "CM's coefficients", "analytic": "Analytic-Precond"}
BASELINE = {"ctm": "ctm", "cd": "cm"}      # the objective's own coefficients, against which Analytic-Precond runs


def reference_stats(work: Path, name: str, make_images, net) -> dict:
    """EDM-layout (mu, sigma) of a reference set, computed once and cached as <work>/fid/ref_<name>.npz."""
    from apctl.metrics.fid import feature_statistics, load_reference_stats, save_reference_stats

    path = work / "fid" / f"ref_{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return load_reference_stats(path)
    started = time.perf_counter()
    images = make_images()
    stats = feature_statistics(net.features(images)["2048"])
    save_reference_stats(path, stats)
    print(f"reference '{name}': {len(images)} images in {time.perf_counter() - started:.0f} s", flush=True)
    return stats


def checkpoint_points(run_dir: Path) -> list[tuple[int, Path | None]]:
    """(step, checkpoint JSON) for every kept checkpoint, newest first, then (0, None) for the initial student."""
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.json"), reverse=True)
    return [(int(p.stem.split("-")[1]), p) for p in ckpts] + [(0, None)]


def initial_student(ckpt_path: Path):
    """The step-0 student of a run: teacher weights + zero-initialised s-embedding (as `prepare` builds it),
    with the run's preconditioning and grid."""
    import torch

    from apctl.networks.student import build_student
    from apctl.training.trained import load_trained_student

    trained = load_trained_student(ckpt_path, "ema")
    teacher = trained.teacher()
    torch.manual_seed(trained.cfg.run.seed)
    trained.net = build_student(trained.checkpoint.meta["student"], teacher.network).eval().requires_grad_(False)
    return trained


def samples(trained, z, labels, nfe: int, batch: int = 128):
    import torch

    from apctl.sampling import SigmaPolicy, student_sample

    sigmas = SigmaPolicy.of(trained.cfg.eval).sigmas(nfe, trained.grid)
    with torch.no_grad():
        return torch.cat([student_sample(trained.net, trained.precond, z[i:i + batch],
                                         sigmas, None if labels is None else labels[i:i + batch]).float()
                          for i in range(0, len(z), batch)]).clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="acceleration_network.py's output directory")
    ap.add_argument("--n", type=int, default=256, help="student samples per FID")
    ap.add_argument("--nfe", type=int, nargs="+", default=[2])
    ap.add_argument("--fid-seed", type=int, default=2024)
    ap.add_argument("--objectives", nargs="+", choices=sorted(BASELINE), default=["ctm"],
                    help="which pairs: ctm (CTM's coefficients vs Analytic-Precond), cd (CM's vs Analytic-Precond)")
    ap.add_argument("--reference-n", type=int, default=0,
                    help="images per reference set (default 0 = all 1,797, as the issue asks; small values for a smoke run)")
    args = ap.parse_args()

    import torch

    from apctl.data.sources import load_training_data
    from apctl.metrics.fid import frechet_distance_from_features
    from apctl.metrics.inception import load_inception
    from apctl.training.trained import load_trained_student

    torch.set_num_threads(1)
    net = load_inception()
    runs = sorted(p for objective in args.objectives for p in (args.work / "runs").glob(f"{objective}-*-seed*") if p.is_dir())
    if not runs:
        sys.exit(f"no {' or '.join(args.objectives)} runs under {args.work / 'runs'}")
    first = load_trained_student(checkpoint_points(runs[0])[0][1])
    teacher = first.teacher()
    real = load_training_data(first.cfg.data).images          # uint8 (N, 1, 16, 16): the images as trained on
    real = real[:args.reference_n or len(real)]
    refs = {"real": reference_stats(args.work, "real", lambda: real, net)}
    zt, yt = fid_noise(len(real), first.shape, first.label_dim, args.fid_seed + 1)
    refs["teacher"] = reference_stats(args.work, "teacher", lambda: teacher_edm_samples(teacher, zt, yt).clamp(-1, 1), net)
    z, y = fid_noise(args.n, first.shape, first.label_dim, args.fid_seed)

    results = []
    for point in range(3):                       # newest checkpoint of every run first, then older, then step 0
        for run_dir in runs:
            points = checkpoint_points(run_dir)
            if point >= len(points):
                continue
            step, ckpt = points[point]
            for nfe in args.nfe:
                cache = args.work / "fid" / f"{run_dir.name}-step{step}-nfe{nfe}-n{args.n}.json"
                if cache.is_file():
                    results.append(json.loads(cache.read_text()))
                    continue
                started = time.perf_counter()
                trained = initial_student(points[0][1]) if ckpt is None else load_trained_student(ckpt, "ema")
                feats = net.features(samples(trained, z, y, nfe))["2048"]
                row = {**run_fields(run_dir.name), "step": step, "nfe": nfe, "n": args.n,
                       **{f"fid_{k}": frechet_distance_from_features(feats, r["mu"], r["sigma"]) for k, r in refs.items()},
                       "seconds": time.perf_counter() - started}
                cache.write_text(json.dumps(row))
                results.append(row)
                print(json.dumps(row), flush=True)
    print(markdown(results))


def run_fields(name: str) -> dict:
    """"<objective>-<coefficients>-seed<k>" (acceleration_network.py's run names) → its fields."""
    objective, kind, seed = name.split("-")
    return {"run": name, "objective": objective, "kind": kind, "seed": int(seed.removeprefix("seed"))}


def markdown(results: list[dict]) -> str:
    """Per NFE: the table of seed means (FID against real digits / teacher samples) for each objective's
    pair, then when Analytic-Precond reaches the baseline's final seed-mean FID against real digits."""
    results = [{**r, **run_fields(r["run"])} for r in results]   # cached rows from before the CD pair lack "objective"
    seeds = defaultdict(list)                                      # (nfe, objective, kind, step) → one row per seed
    for r in results:
        seeds[r["nfe"], r["objective"], r["kind"], r["step"]].append(r)
    lines = []
    for nfe in sorted({r["nfe"] for r in results}):
        steps = sorted({r["step"] for r in results if r["nfe"] == nfe})
        lines += [f"NFE {nfe}: FID of {results[0]['n']} samples against all 1,797 real digits / 1,797 teacher samples",
                  "", "| objective | coefficients | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        reach = []
        for objective in sorted({r["objective"] for r in results if r["nfe"] == nfe}, reverse=True):
            curves = {}                                            # kind → seed-mean FID vs real digits per step
            for kind in (BASELINE[objective], "analytic"):
                points = [seeds[nfe, objective, kind, s] for s in steps]
                lines.append(f"| {objective.upper()} | {LABEL[kind]} | " + " | ".join(map(_cell, points)) + " |")
                if all(points):
                    curves[kind] = [statistics.mean(r["fid_real"] for r in rs) for rs in points]
            if len(curves) == 2:
                reach.append(_reached(objective, steps, curves))
        lines += ["", *reach, ""]
    return "\n".join(lines)


def _cell(rows: list[dict]) -> str:
    def pm(values):
        return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}" if values else "—"

    return f"{pm([r['fid_real'] for r in rows])} / {pm([r['fid_teacher'] for r in rows])} ({len(rows)} seeds)"


def _reached(objective: str, steps: list[int], curves: dict[str, list[float]]) -> str:
    baseline = BASELINE[objective]
    s = speedup(steps, curves[baseline], curves["analytic"])
    reached = "never" if s["candidate_steps"] is None else f"at step {s['candidate_steps']}"
    return (f"{objective.upper()}, the final FID of {LABEL[baseline]} against real digits ({s['target']:.2f}, "
            f"step {s['baseline_steps']}): reached by Analytic-Precond {reached}, {format_ratio(s['ratio'])}")


if __name__ == "__main__":
    main()
