"""Does Analytic-Precond accelerate distillation of a trained diffusion *network*? (digits-net)

The paper's setting scaled to a CPU: the 16×16 digits teacher network (`digits-teacher`) distilled
into a student initialised from it (preset `digits-net`). Four variants, each for every seed, all
with the same budget, the same seed ⇒ the same data and noise streams, and the same probe noise:

    CTM objective (sony/ctm's rules):  CTM's coefficients (precond.kind = "ctm", preset digits-net-ctm)
                                       vs Analytic-Precond (precond.kind = "analytic", preset digits-net)
    CD objective (objective.kind = "cd"): CM's coefficients (precond.kind = "cm") vs Analytic-Precond

What is measured:
  * every `training.eval_every` iterations (and at step 0): the evaluation-EMA student's 1-, 2- and
    4-step trajectory-alignment RMS against the teacher's ODE (64 Heun steps) on the `[eval]` probe
    noise (256 samples). The probe's teacher solution is computed once and shared by every run;
  * at the end of each run (final EMA): FID at NFE 1 and 2 of `--fid-samples` student samples against
    (a) all 1,797 real digits and (b) 1,797 samples of the teacher's EDM sampler (18 Karras levels + 0,
    35 NFE). Student and teacher FID samples share one fixed noise (classes cycle 0..9). The Inception
    features of a sample set are computed once and compared with both references; the time of one FID
    evaluation (Inception features + Fréchet distance) is printed.
    FID during training costs ~6 GFLOP per image at 299 px on this CPU, so `--fid-every` defaults to 0
    (final only); `--fid-every M` (a multiple of eval_every) adds FIDs every M iterations.
  * the Analytic-Precond statistics are estimated once (`precond.statistics_file`), shared by all
    Analytic-Precond runs.

Printed (markdown, for docs/benchmarks.md): final 1/2/4-step RMS and FIDs, mean ± std (population,
ddof = 0) over seeds; the speed-up = iterations the baseline (CTM's / CM's coefficients) needs to reach
its own final 2-step (1-step, 4-step) RMS ÷ iterations Analytic-Precond needs for that value, on the
seed-mean curves and per seed (> 1 = Analytic-Precond faster; resolution = eval_every). The paper:
CTM 2–3× at 2 steps, ≈ 1× at 1 step; CD about equal. Caveat: every multi-step figure samples
with CTM's γ = 0 jumps; a CD student is trained only for jumps to σ_min, so its intermediate jumps are
whatever the initial (teacher) denoiser gives with each coefficient choice, and the CD pair is
like-for-like only at NFE 1 (its 2-/4-step rows are printed but not comparable). Also written: <out>/acceleration_digits_net.json
(everything) and <out>/acceleration_digits_net.png (one panel per NFE, seed-mean with min–max band).

    python bench/acceleration_network.py --set teacher.file="/work/main/teachers/digits-teacher.safetensors"
    python bench/acceleration_network.py --seeds 0 --set training.iterations=4 --set training.eval_every=2 \
        --fid-samples 64 --set teacher.file="/tmp/quick-teacher/teacher.safetensors"       # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acceleration import format_ratio, speedup  # noqa: E402

NFES = (1, 2, 4)
FID_NFES = (1, 2)
# (objective, coefficients, preset): the baseline of each pair first.
VARIANTS = [("ctm", "ctm", "digits-net-ctm"), ("ctm", "analytic", "digits-net"),
            ("cd", "cm", "digits-net"), ("cd", "analytic", "digits-net")]
PAIRS = {"ctm": ("ctm", "analytic"), "cd": ("cm", "analytic")}
LABEL = {"ctm": "CTM's coefficients", "cm": "CM's coefficients", "analytic": "Analytic-Precond"}


# ---------------------------------------------------------------------------------------------- helpers

def build_parts(cfg):
    """Teacher (on the run's device), training data and data source of a config, as `prepare` builds them."""
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.teachers import build_teacher
    from apctl.training.run import resolve_device

    data = load_training_data(cfg.data)
    teacher = build_teacher(cfg.teacher, data)
    teacher.to(resolve_device(cfg.run.device))
    return teacher, data, build_data_source(cfg.data, teacher, data)


def fid_noise(n: int, shape, label_dim: int, seed: int):
    """The fixed FID noise: z ~ N(0, I) from `seed`, classes cycling 0..label_dim−1 (one-hot)."""
    import torch

    from apctl.sampling import class_labels

    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)), class_labels(n, label_dim)


def teacher_edm_samples(teacher, z, labels, steps: int = 18, batch: int = 256, device="cpu"):
    """EDM's deterministic sampler on the teacher: Heun over `steps` Karras levels then an Euler step to
    σ = 0 (2·steps − 1 evaluations: 35 for 18), from σ_max·z. Returns float32 (N, *shape) on the CPU."""
    import torch

    from apctl.sampling import heun_solve
    from apctl.schedules import karras_sigmas

    sigmas = karras_sigmas(steps).tolist() + [0.0]
    out = []
    with torch.no_grad():
        for i in range(0, len(z), batch):
            x = (z[i:i + batch] * sigmas[0]).to(device)
            y = None if labels is None else labels[i:i + batch].to(x.device)
            out.append(heun_solve(teacher, x.to(teacher.dtype), sigmas, y).float().cpu())
    return torch.cat(out)


def student_samples(run, z, labels, nfe: int, batch: int = 256):
    """`nfe`-step samples of the run's evaluation EMA from unit noise z (CTM γ = 0), as the probe takes them."""
    import torch

    from apctl.sampling import SigmaPolicy, student_sample

    sigmas = SigmaPolicy.of(run.cfg.eval).sigmas(nfe, run.grid)
    out = []
    for i in range(0, len(z), batch):
        y = None if labels is None else labels[i:i + batch].to(run.device)
        out.append(student_sample(run.ema, run.precond, z[i:i + batch].to(run.device), sigmas, y).float().cpu())
    return torch.cat(out)


def fid_pair(images, refs: dict, net) -> dict:
    """FID of `images` against each reference ({'real': {mu, sigma}, 'teacher': …}); features computed once."""
    from apctl.metrics.fid import frechet_distance_from_features

    started = time.perf_counter()
    feats = net.features(images.clamp(-1, 1))["2048"]
    out = {name: frechet_distance_from_features(feats, r["mu"], r["sigma"]) for name, r in refs.items()}
    out["seconds"] = time.perf_counter() - started
    return out


def load_refs(path: str) -> dict:
    from apctl.metrics.fid import load_reference_stats

    return {name: load_reference_stats(Path(path) / f"fid_ref_{name}.npz") for name in ("real", "teacher")}


# ------------------------------------------------------------------------------------- preparation jobs

def prep_job(args: tuple[str, str, list[str], dict]) -> dict:
    """One of the once-per-benchmark preparations, run in a pool worker (single-threaded)."""
    what, preset, extra, opts = args
    import torch

    torch.set_num_threads(1)
    from apctl.presets import load_config

    cfg, _ = load_config(preset, extra + ["run.threads=1"])
    out = Path(opts["work"])
    started = time.perf_counter()
    info: dict = {"job": what}
    # Reused when an earlier invocation made it with the same teacher and settings.
    from apctl.teachers import build_teacher

    key = {"job": what, "teacher": build_teacher(cfg.teacher, None).fingerprint() if what != "real" else None,
           "settings": repr({"statistics": cfg.precond.statistics, "probe": cfg.eval}.get(what, cfg.data)),
           "reference_samples": opts["reference_samples"], "fid_seed": opts["fid_seed"]}
    key_file = out / f"{what}.key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) == key:
        return dict(info, seconds=0.0, reused=str(key_file))
    if what == "statistics":
        from apctl.preconditioning.build import compute_statistics

        teacher, _, source = build_parts(cfg)
        compute_statistics(cfg.precond.statistics, teacher, source).save(out / "precond_stats.safetensors")
    elif what == "probe":
        from apctl.metrics.alignment import AlignmentProbe

        teacher, _, source = build_parts(cfg)
        e = cfg.eval
        probe = AlignmentProbe(teacher, source.shape, e.n_samples, e.seed, e.teacher_steps, source.label_dim)
        torch.save({"z": probe.z, "labels": probe.labels, "reference": probe.reference}, out / "probe.pt")
        info.update(n=e.n_samples, teacher_steps=e.teacher_steps)
    elif what == "real":
        from apctl.data.sources import load_training_data
        from apctl.metrics.fid import compute_reference_stats

        images = load_training_data(cfg.data).to_tensor()
        images = images[:opts["reference_samples"] or len(images)]
        t0 = time.perf_counter()
        ref = compute_reference_stats(images, out / "fid_ref_real.npz")
        info.update(n=len(images), inception_seconds=time.perf_counter() - t0, weights=ref["weights_source"])
    elif what == "teacher":
        from apctl.metrics.fid import compute_reference_stats

        teacher, data, source = build_parts(cfg)
        n = min(len(data), opts["reference_samples"] or len(data))
        z, labels = fid_noise(n, source.shape, source.label_dim, opts["fid_seed"])
        from apctl.training.run import resolve_device

        samples = teacher_edm_samples(teacher, z, labels, device=resolve_device(cfg.run.device))
        sampled = time.perf_counter()
        torch.save({"samples": samples}, out / "teacher_samples.pt")
        ref = compute_reference_stats(samples.clamp(-1, 1), out / "fid_ref_teacher.npz")   # EDM clips too
        info.update(n=n, sampling_seconds=sampled - started, inception_seconds=time.perf_counter() - sampled,
                    weights=ref["weights_source"])
    info["seconds"] = time.perf_counter() - started
    key_file.write_text(json.dumps(key))
    return info


# ----------------------------------------------------------------------------------------------- a run

def one_run(args: tuple[str, str, str, int, list[str], dict]) -> dict:
    objective, kind, preset, seed, extra, opts = args
    import torch

    torch.set_num_threads(1)
    from apctl.presets import load_config
    from apctl.metrics.alignment import AlignmentProbe
    from apctl.metrics.evaluation import measure
    from apctl.sampling import SigmaPolicy
    from apctl.metrics.inception import load_inception
    from apctl.training.run import prepare, train

    work = Path(opts["work"])
    overrides = extra + [f'objective.kind="{objective}"', f'precond.kind="{kind}"', f"run.seed={seed}", "run.threads=1"]
    if kind == "analytic":
        overrides.append(f'precond.statistics_file="{work / "precond_stats.safetensors"}"')
    cfg, _ = load_config(preset, overrides)
    run_dir = work / "runs" / f"{objective}-{kind}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)

    # The shared probe: the same fixed noise and teacher-ODE solution that training_probe would build.
    saved = torch.load(work / "probe.pt")
    probe = AlignmentProbe.__new__(AlignmentProbe)
    probe.z, probe.labels, probe.reference = saved["z"], saved["labels"], saved["reference"]
    with_fid = opts["fid_samples"] > 0
    refs = load_refs(opts["work"]) if with_fid else None
    net = load_inception() if with_fid else None
    z_fid, y_fid = fid_noise(opts["fid_samples"], probe.z.shape[1:], 0 if probe.labels is None else probe.labels.shape[1],
                             opts["fid_seed"]) if with_fid else (None, None)
    timings = {"probe": 0.0, "fid": 0.0}

    def fids(run) -> dict:
        out = {}
        for nfe in FID_NFES:
            r = fid_pair(student_samples(run, z_fid, y_fid, nfe), refs, net)
            out[f"fid_real_nfe{nfe}"], out[f"fid_teacher_nfe{nfe}"] = r["real"], r["teacher"]
            out[f"fid_seconds_nfe{nfe}"] = r["seconds"]
        return out

    def evaluate(run) -> dict:
        t0 = time.perf_counter()
        results = measure(probe, run.ema, run.precond, run.grid, NFES, policy=SigmaPolicy.of(run.cfg.eval))
        logs = {f"align_nfe{n}": results[f"nfe={n}"]["alignment_rms"] for n in NFES}
        timings["probe"] += time.perf_counter() - t0
        if opts["fid_every"] and run.step % opts["fid_every"] == 0 and run.step < run.cfg.training.iterations:
            t0 = time.perf_counter()
            logs.update(fids(run))
            timings["fid"] += time.perf_counter() - t0
        return logs

    started = time.perf_counter()
    run = prepare(cfg, run_dir)
    prepared = time.perf_counter()
    train(run, None, evaluate)
    trained = time.perf_counter()
    final = fids(run) if with_fid else {}
    curve = [{"step": h["step"], **{f"nfe{n}": h[f"align_nfe{n}"] for n in NFES},
              **{k: v for k, v in h.items() if k.startswith("fid_")}} for h in run.history if "align_nfe1" in h]
    train_seconds = trained - prepared - timings["probe"] - timings["fid"]
    return {"objective": objective, "kind": kind, "preset": preset, "seed": seed, "curve": curve, "final_fid": final,
            "iterations": cfg.training.iterations, "seconds": time.perf_counter() - started,
            "prepare_seconds": prepared - started, "train_seconds": train_seconds,
            "seconds_per_iteration": train_seconds / max(cfg.training.iterations, 1),
            "probe_seconds": timings["probe"], "fid_during_training_seconds": timings["fid"],
            "final_fid_seconds": time.perf_counter() - trained}


# ------------------------------------------------------------------------------------------- summaries

def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def summarise_pair(results: list[dict], objective: str) -> dict:
    """Final RMS / FID mean ± std per variant and the speed-up of Analytic-Precond over the baseline."""
    base_kind, ap_kind = PAIRS[objective]
    runs = {k: sorted((r for r in results if r["objective"] == objective and r["kind"] == k), key=lambda r: r["seed"])
            for k in (base_kind, ap_kind)}
    steps = [c["step"] for c in runs[base_kind][0]["curve"]]
    out: dict = {"objective": objective, "baseline": base_kind, "seeds": [r["seed"] for r in runs[base_kind]],
                 "steps": steps, "variants": {}, "speedup": {}}
    for kind, rs in runs.items():
        v: dict = {}
        for n in NFES:
            curves = [[c[f"nfe{n}"] for c in r["curve"]] for r in rs]
            v[f"nfe{n}"] = {"final": mean_std([c[-1] for c in curves]),
                            "mean": [statistics.mean(col) for col in zip(*curves)],
                            "min": [min(col) for col in zip(*curves)], "max": [max(col) for col in zip(*curves)]}
        v["fid"] = {k: mean_std([r["final_fid"][k] for r in rs]) for k in rs[0]["final_fid"] if not k.startswith("fid_seconds")}
        speeds = [1 / r["seconds_per_iteration"] for r in rs if r.get("seconds_per_iteration")]
        v["iterations_per_second"] = mean_std(speeds) if speeds else (math.nan, math.nan)
        out["variants"][kind] = v
    for n in NFES:
        pooled = speedup(steps, out["variants"][base_kind][f"nfe{n}"]["mean"], out["variants"][ap_kind][f"nfe{n}"]["mean"])
        pooled["per_seed"] = [speedup(steps, [c[f"nfe{n}"] for c in a["curve"]], [c[f"nfe{n}"] for c in b["curve"]])["ratio"]
                              for a, b in zip(runs[base_kind], runs[ap_kind])]
        out["speedup"][f"nfe{n}"] = pooled
    return out


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"ctm": ("tab:blue", "--"), "cm": ("tab:green", "--"), "analytic": ("tab:red", "-")}
    fig, axes = plt.subplots(len(summaries), len(NFES), figsize=(4.2 * len(NFES), 3.4 * len(summaries)), squeeze=False)
    for row, s in zip(axes, summaries):
        for ax, n in zip(row, NFES):
            for kind, v in s["variants"].items():
                colour, ls = style[kind]
                c = v[f"nfe{n}"]
                ax.plot(s["steps"], c["mean"], color=colour, ls=ls, label=f"{LABEL[kind]} (mean of {len(s['seeds'])})")
                ax.fill_between(s["steps"], c["min"], c["max"], color=colour, alpha=0.2)
            ax.set_yscale("log")
            ax.set_xlabel("training iteration")
            ax.set_ylabel(f"{n}-step alignment RMS vs teacher ODE")
            ax.set_title(f"{s['objective'].upper()} objective, NFE {n}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("digits-net: Analytic-Precond vs baseline coefficients (band: min–max over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summaries: list[dict], results: list[dict], prep: list[dict], wall: float, command: str) -> str:
    pm = lambda ms, d=4: f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    with_fid = results[0]["fid_samples"] > 0
    fid_note = (f"final-EMA FID of {results[0]['fid_samples']} samples against all real digits / the teacher's "
                "35-NFE samples" if with_fid else "no FID (--fid-samples 0)")
    lines = [f"`{command}`", "",
             f"{len(results)} runs, {wall / 60:.1f} min wall; seeds {summaries[0]['seeds']}; "
             f"{results[0]['iterations']} iterations each; {fid_note}; mean ± std over seeds (ddof 0).", "",
             "| objective | coefficients | RMS 1 step | RMS 2 steps | RMS 4 steps | it/s |"
             + (" FID 1 step (real / teacher) | FID 2 steps (real / teacher) |" if with_fid else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if with_fid else "")]
    for s in summaries:
        for kind, v in s["variants"].items():
            f = v["fid"]
            row = (f"| {s['objective'].upper()} | {LABEL[kind]} | {pm(v['nfe1']['final'])} | {pm(v['nfe2']['final'])} | "
                   f"{pm(v['nfe4']['final'])} | {pm(v['iterations_per_second'], 2)} |")
            if with_fid:
                row += (f" {pm(f['fid_real_nfe1'], 1)} / {pm(f['fid_teacher_nfe1'], 1)} | "
                        f"{pm(f['fid_real_nfe2'], 1)} / {pm(f['fid_teacher_nfe2'], 1)} |")
            lines.append(row)
    lines += ["", "| objective | NFE | baseline's final RMS | its baseline → its AP to reach it | speed-up (seed mean) | per seed |",
              "|---|---|---|---|---|---|"]
    for s in summaries:
        for n in NFES:
            r = s["speedup"][f"nfe{n}"]
            lines.append(f"| {s['objective'].upper()} | {n} | {r['target']:.4f} | {r['baseline_steps']} → {r['candidate_steps']} | "
                         f"{format_ratio(r['ratio'])} | {', '.join(map(format_ratio, r['per_seed']))} |")
    if any(x["objective"] == "cd" for x in summaries):
        lines += ["", "CD: compare at NFE 1 only — a CD student is trained only for jumps to σ_min, so its γ = 0 "
                  "multi-step RMS, FID and speed-ups are not like-for-like."]
    per_it = [r["seconds_per_iteration"] for r in results]
    fid_s = [r["final_fid"][f"fid_seconds_nfe{n}"] for r in results for n in FID_NFES if with_fid]
    fid_time = (f"one FID evaluation ({results[0]['fid_samples']} samples, Inception features + 2 Fréchet distances) "
                f"{statistics.mean(fid_s):.1f} s; " if with_fid else "")
    lines += ["", f"Timing: {statistics.mean(per_it):.3f} s per training iteration (1 thread, mean over runs); "
              f"{fid_time}preparation: " +
              ", ".join(f"{p['job']} {p['seconds']:.0f} s" for p in prep) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-threaded processes")
    parser.add_argument("--objectives", nargs="+", choices=sorted(PAIRS), default=["ctm", "cd"])
    parser.add_argument("--out", default="bench/results", help="where the JSON and PNG go")
    parser.add_argument("--work", default=None, help="run directories and shared files (default: <out>/digits_net)")
    parser.add_argument("--fid-samples", type=int, default=1797,
                        help="student samples per FID (default 1797; 0 = no FID, alignment curves only)")
    parser.add_argument("--fid-every", type=int, default=0,
                        help="also FID every M iterations (a multiple of training.eval_every); 0 = final only")
    parser.add_argument("--reference-samples", type=int, default=0,
                        help="real digits / teacher samples in the FID references (default 0 = all 1797; smaller only to test)")
    parser.add_argument("--fid-seed", type=int, default=2024, help="seed of the fixed FID noise")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help='preset overrides for every run, e.g. teacher.file="PATH" or training.iterations=1200')
    args = parser.parse_args()
    command = "python bench/acceleration_network.py " + shlex.join(sys.argv[1:])
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from apctl.presets import load_config

    cfg, _ = load_config("digits-net", args.overrides)      # fail early on a bad override
    if args.fid_every and args.fid_every % max(cfg.training.eval_every, 1):
        parser.error(f"--fid-every {args.fid_every} is not a multiple of training.eval_every = {cfg.training.eval_every}")
    work = Path(args.work or Path(args.out) / "digits_net")
    work.mkdir(parents=True, exist_ok=True)
    opts = {"work": str(work), "fid_samples": args.fid_samples, "fid_every": args.fid_every, "fid_seed": args.fid_seed,
            "reference_samples": args.reference_samples}

    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool:
        # Once per benchmark: statistics, the probe's teacher solution, the two FID references.
        needed = ("teacher", "statistics", "probe", "real") if args.fid_samples > 0 else ("statistics", "probe")
        prep = pool.map(prep_job, [(w, "digits-net", args.overrides, opts) for w in needed], chunksize=1)
        for p in prep:
            print(f"prepared {p['job']}: {p['seconds']:.1f} s " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                                              for k, v in p.items() if k not in ("job", "seconds")),
                  flush=True)
        jobs = [(o, k, p, s, args.overrides, opts) for s in args.seeds for o, k, p in VARIANTS if o in args.objectives]
        results = []
        for r in pool.imap_unordered(one_run, jobs):
            results.append(dict(r, fid_samples=args.fid_samples))
            print(f"done {r['objective']}/{r['kind']} seed {r['seed']}: {r['seconds']:.0f} s "
                  f"({r['seconds_per_iteration']:.3f} s/it; final FID {r['final_fid_seconds']:.0f} s), "
                  f"RMS 1/2/4 = {r['curve'][-1]['nfe1']:.4f}/{r['curve'][-1]['nfe2']:.4f}/{r['curve'][-1]['nfe4']:.4f}",
                  flush=True)
    wall = time.perf_counter() - started
    summaries = [summarise_pair(results, o) for o in args.objectives]
    out = Path(args.out)
    plot(summaries, out / "acceleration_digits_net.png")
    table = markdown(summaries, results, prep, wall, command)
    (out / "acceleration_digits_net.json").write_text(json.dumps(
        {"command": command, "wall_seconds": wall, "preparation": prep, "runs": results, "summaries": summaries},
        indent=1))
    print(f"\n# bench/acceleration_network.py — digits-net, {len(results)} runs\n")
    print(table)
    print(f"\nwritten: {out / 'acceleration_digits_net.json'}, {out / 'acceleration_digits_net.png'}")


if __name__ == "__main__":
    sys.exit(main())
