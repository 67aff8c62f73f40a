"""Training-step cost (issue 7 §4): the full CTM step against the sum of its unavoidable passes,
and Analytic-Precond's step time against CTM's closed-form coefficients'.

Measured, in one process and on one thread, per preset (statistics shrunk to 16 levels × 64
samples, no evaluation: neither is timed):

(a) the full step, `apctl.training.step.train_step(run, step, run.student)`;
(b) the same step taken apart, with the same draws (`step_draws`, `shared_generator`), hence
    the same data, the same k (one per step, p(k) ∝ k), i, j, ε and DSM σ, and the same shapes:
    draws · teacher Heun chain of k steps (`objective.teacher_steps`) · student inner jump
    G_θ(x_t, t, s) · θ⁻ outer jump to σ_min (grad-enabled) · target branch (θ inner + θ⁻ outer, no grad)
    · distance · DSM forward · one `loss.backward()` of the same total · optimizer step · the two
    EMA updates. Timed as well but kept out of Σ: the adaptive DSM weight (two `autograd.grad`
    calls w.r.t. the output-layer weight, part of CTM's rule; the ratio is shown with it counted
    too) and the gradient norm `train_step` computes for its logs and fp16 skip.
    Before timing, one step of each kind is run from the same state and compared (loss, θ, θ⁻):
    the decomposition computes what `train_step` computes.
(c) `precond.kind = "analytic"` against `"ctm"`, everything else equal: full steps, interleaved.

Measurements alternate (A, B, B, A, …) step by step over a fixed set of step indices (so every
variant sees the same k sequence), after warm-up steps. Times are medians over repeats of the
repeat totals (per step); each ratio is given twice: the median over repeats of the ratio of repeat
totals, and the median over all adjacent (A, B) pairs of their ratio (the more robust of the two
on a shared machine, where one repeat can be hit by another job).

    OMP_NUM_THREADS=1 python bench/step_cost.py            # toy2d and digits-img, ≈ 5 min on 2 cores
    OMP_NUM_THREADS=1 python bench/step_cost.py --presets toy2d --steps 30 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

SHRINK = ["precond.statistics.n_points=16", "precond.statistics.n_samples=64", "training.eval_every=0",
          "run.threads=1"]

# Passes in the order the step runs them; COUNTED make up Σ, EXTRA are timed but not in Σ.
COUNTED = ["draws (data, i/k/j, ε, DSM σ and noise)", "teacher Heun chain (2k teacher evals)",
           "student inner jump G_θ (grad)", "θ⁻ outer jump to σ_min (grad-enabled)",
           "target branch: θ inner + θ⁻ outer (no grad)", "distance", "DSM forward (student)",
           "backward (one loss.backward())", "optimizer step", "EMA updates (θ⁻, eval EMA)"]
ADAPTIVE = "adaptive DSM weight (2 autograd.grad)"
GRADNORM = "grad norm (clip_grad_norm_, logs / fp16 skip)"
EXTRA = [ADAPTIVE, GRADNORM]


def prepare_run(preset: str, kind: str | None, tmp: str):
    from apctl.presets import load_config
    from apctl.training.run import prepare

    overrides = SHRINK + ([f'precond.kind="{kind}"'] if kind else [])
    cfg, _ = load_config(preset, overrides)
    if cfg.objective.kind != "ctm" or cfg.training.precision != "fp32":
        raise SystemExit(f"{preset}: step_cost.py measures the CTM objective in fp32")
    run = prepare(cfg, tmp)
    torch.set_num_threads(1)
    return run


def full_step(run, step: int) -> float:
    from apctl.training.step import train_step

    start = time.perf_counter()
    train_step(run, step, run.student)
    return time.perf_counter() - start


def decomposed_step(run, step: int) -> tuple[dict[str, float], torch.Tensor]:
    """`train_step` (fp32, one rank) pass by pass, through the objective's own pieces."""
    from apctl.objectives.consistency import _unwrap, adaptive_weight, dsm_sigmas
    from apctl.preconditioning.table import jump_on_grid
    from apctl.training.ema import ema_update
    from apctl.training.step import shared_generator, step_draws

    cfg, tc, obj = run.cfg, run.cfg.training, run.objective
    student, target, table = run.student, run.target, run.objective.table
    times: dict[str, float] = {}
    clock = time.perf_counter

    t0 = clock()
    # The per-sample draws in train_step's order (one micro-batch): data, indices, ε, DSM σ, DSM noise.
    gen = step_draws(cfg.run.seed, step, range(tc.batch_size), tc.batch_size)
    x0, labels = run.data_source.sample(tc.batch_size, gen)
    x0 = x0.to(run.device)
    labels = None if labels is None else labels.to(run.device)
    B, shape = x0.shape[0], (-1,) + (1,) * (x0.dim() - 1)
    i, k, j, k_max = obj.sample_indices(B, gen, shared_generator(cfg.run.seed, step))
    eps = gen.randn(x0.shape[1:]).to(x0)
    x_t = x0 + table.sigma[i].to(x0.dtype).view(shape) * eps
    sigma = dsm_sigmas(B, obj.dsm_sigma_law, obj.dsm_uniform_fraction, gen).to(device=run.device, dtype=torch.float32)
    noise = gen.randn(x0.shape[1:]).to(x0)
    t1 = clock(); times[COUNTED[0]] = t1 - t0

    x_u = obj.teacher_steps(x_t, i, k, k_max, labels)
    t2 = clock(); times[COUNTED[1]] = t2 - t1

    inner = jump_on_grid(table, student, x_t, i, j, labels)
    t3 = clock(); times[COUNTED[2]] = t3 - t2

    estimate = obj.to_sigma_min(target, inner, j, labels)
    t4 = clock(); times[COUNTED[3]] = t4 - t3

    with torch.no_grad():
        inner_net = _unwrap(student) if obj.target_inner == "student" else target
        goal = obj.to_sigma_min(target, jump_on_grid(table, inner_net, x_u, i + k, j, labels), j, labels)
    t5 = clock(); times[COUNTED[4]] = t5 - t4

    consistency = obj.distance(estimate, goal).mean()
    t6 = clock(); times[COUNTED[5]] = t6 - t5

    denoised = student(x0 + sigma.to(x0.dtype).view(shape) * noise, sigma, sigma, labels)
    w = (sigma ** 2 + obj.sigma_data ** 2) / (sigma * obj.sigma_data) ** 2
    dsm = (w * (denoised - x0).float().pow(2).flatten(1).mean(1)).mean()
    t7 = clock(); times[COUNTED[6]] = t7 - t6

    if obj.dsm_weighting == "adaptive":
        lam = adaptive_weight(consistency, dsm, _unwrap(student).output_weight())
    else:
        lam = torch.tensor(obj.dsm_weight, device=run.device)
    t8 = clock(); times[ADAPTIVE] = t8 - t7

    loss = consistency + lam * dsm
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t9 = clock(); times[COUNTED[7]] = t9 - t8

    torch.nn.utils.clip_grad_norm_(student.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    t10 = clock(); times[GRADNORM] = t10 - t9

    run.optimizer.step()
    t11 = clock(); times[COUNTED[8]] = t11 - t10

    took = torch.ones((), dtype=torch.bool, device=run.device)
    ema_update(run.target, student, cfg.objective.target_ema, took)
    ema_update(run.ema, student, tc.ema_decay, took)
    times[COUNTED[9]] = clock() - t11
    return times, loss.detach()


def check_parity(run, step: int) -> float:
    """One train_step and one decomposed step from the same state (and dropout seed) must agree."""
    from apctl.training.step import train_step

    saved = [copy.deepcopy(m.state_dict()) for m in (run.student, run.target, run.ema)]
    saved_opt = copy.deepcopy(run.optimizer.state_dict())

    def restore():
        for m, s in zip((run.student, run.target, run.ema), saved):
            m.load_state_dict(s)
        run.optimizer.load_state_dict(saved_opt)

    torch.manual_seed(1234)
    loss_a = train_step(run, step, run.student)["loss"]
    after_a = [p.detach().clone() for m in (run.student, run.target) for p in m.parameters()]
    restore()
    torch.manual_seed(1234)
    _, loss_b = decomposed_step(run, step)
    after_b = [p.detach().clone() for m in (run.student, run.target) for p in m.parameters()]
    restore()
    worst = max(float((a - b).abs().max()) for a, b in zip(after_a, after_b))
    if not torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7) or worst > 1e-5:
        raise SystemExit(f"decomposition differs from train_step at step {step}: loss {float(loss_a)} vs "
                         f"{float(loss_b)}, max |Δθ| {worst:.2e} — bench/step_cost.py is out of date")
    return worst


def k_of(run, step: int) -> int:
    from apctl.training.step import shared_generator, step_draws

    gen = step_draws(run.cfg.run.seed, step, range(run.cfg.training.batch_size), run.cfg.training.batch_size)
    run.data_source.sample(run.cfg.training.batch_size, gen)
    return run.objective.sample_indices(run.cfg.training.batch_size, gen, shared_generator(run.cfg.run.seed, step))[3]


def interleave(fns, steps, repeats):
    """fns: name -> f(step) returning seconds or a dict of seconds. Per step index the variants run
    back to back, their order alternating; returns samples[name][key][repeat][n_step] in seconds."""
    names = list(fns)
    samples: dict = {n: {} for n in names}
    for r in range(repeats):
        for n_step, step in enumerate(steps):
            for n in (names if (r + n_step) % 2 == 0 else names[::-1]):
                got = fns[n](step)
                for key, v in (got if isinstance(got, dict) else {"step": got}).items():
                    rows = samples[n].setdefault(key, [[0.0] * len(steps) for _ in range(repeats)])
                    rows[r][n_step] = v
    return samples


def paired(a, b):
    """(median over repeats of Σa/Σb, median over all adjacent pairs of a/b, min and max of the per-repeat ratios)."""
    per_repeat = [sum(x) / sum(y) for x, y in zip(a, b)]
    per_pair = [x / y for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return statistics.median(per_repeat), statistics.median(per_pair), min(per_repeat), max(per_repeat)


def add(*rows):
    return [[sum(v) for v in zip(*cols)] for cols in zip(*rows)]


def bench_preset(preset: str, steps: list[int], warmup: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp_ap, tempfile.TemporaryDirectory() as tmp_ctm:
        ap = prepare_run(preset, "analytic", tmp_ap)
        ctm = prepare_run(preset, "ctm", tmp_ctm)
        check_parity(ap, steps[0])
        ks = [k_of(ap, s) for s in steps]
        assert ks == [k_of(ctm, s) for s in steps]
        for w in range(warmup):   # warm-up on step indices outside the timed set
            full_step(ap, 10**6 + w), decomposed_step(ap, 10**6 + w), full_step(ctm, 10**6 + w)

        # (a) vs (b), on the preset's own preconditioning (Analytic-Precond).
        s = interleave({"full": lambda st: full_step(ap, st), "parts": lambda st: decomposed_step(ap, st)[0]},
                       steps, repeats)
        n = len(steps)
        full, parts = s["full"]["step"], s["parts"]
        sigma = add(*(parts[key] for key in COUNTED))
        per_step_ms = lambda rows: statistics.median(sum(r) for r in rows) / n * 1e3  # noqa: E731

        # (c) Analytic-Precond vs CTM coefficients, full steps, same k sequence.
        c = interleave({"analytic": lambda st: full_step(ap, st), "ctm": lambda st: full_step(ctm, st)}, steps, repeats)
        return dict(preset=preset, ks=ks, batch=ap.cfg.training.batch_size, student=ap.cfg.student.kind,
                    step_ms=per_step_ms(full), parts_ms={key: per_step_ms(parts[key]) for key in COUNTED + EXTRA},
                    sigma_ms=per_step_ms(sigma),
                    ratio=paired(full, sigma), ratio_adaptive=paired(full, add(sigma, parts[ADAPTIVE])),
                    ratio_all=paired(full, add(*parts.values())),
                    ms={v: per_step_ms(c[v]["step"]) for v in ("analytic", "ctm")},
                    ap_over_ctm=paired(c["ctm"]["step"], c["analytic"]["step"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["toy2d", "digits-img"])
    parser.add_argument("--steps", type=int, default=12, help="timed step indices per repeat (the same for all variants)")
    parser.add_argument("--first-step", type=int, default=1000, help="index of the first timed step (fixes the k draws)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = list(range(args.first_step, args.first_step + args.steps))
    print(f"# bench/step_cost.py (1 thread; steps {steps[0]}…{steps[-1]}, {args.warmup} warm-up, "
          f"medians over {args.repeats} repeats)")
    results = []
    for preset in args.presets:
        started = time.perf_counter()
        res = bench_preset(preset, steps, args.warmup, args.repeats)
        res["wall"] = time.perf_counter() - started
        results.append(res)
        print(f"\n## {preset} (batch {res['batch']}, {res['student']} student; k per step: {res['ks']}, "
              f"mean {statistics.mean(res['ks']):.1f}; {res['wall']:.0f} s)\n")
        print("| pass | ms / step | % of step |")
        print("|---|---|---|")
        for key in COUNTED:
            print(f"| {key} | {res['parts_ms'][key]:.2f} | {100 * res['parts_ms'][key] / res['step_ms']:.1f} |")
        print(f"| **Σ unavoidable passes** | **{res['sigma_ms']:.2f}** | {100 * res['sigma_ms'] / res['step_ms']:.1f} |")
        for key in EXTRA:
            print(f"| (not in Σ) {key} | {res['parts_ms'][key]:.2f} | {100 * res['parts_ms'][key] / res['step_ms']:.1f} |")
        rest = res["step_ms"] - res["sigma_ms"] - sum(res["parts_ms"][k] for k in EXTRA)
        print(f"| (not in Σ) rest: step − all of the above | {rest:.2f} | {100 * rest / res['step_ms']:.1f} |")
        print(f"| **full train_step** | **{res['step_ms']:.2f}** | 100 |")
    fmt = lambda r: f"{r[0]:.3f} / {r[1]:.3f} [{r[2]:.3f}–{r[3]:.3f}]"  # noqa: E731
    print("\nRatios: median over repeats of the repeat totals / median over all adjacent pairs "
          "[min–max of the repeat totals' ratios].\n")
    print("| preset | step / Σ (target ≤ 1.15) | step / (Σ + adaptive weight) | step / all timed parts |")
    print("|---|---|---|---|")
    for res in results:
        print(f"| {res['preset']} | {fmt(res['ratio'])} | {fmt(res['ratio_adaptive'])} | {fmt(res['ratio_all'])} |")
    print("\n| preset | Analytic-Precond ms/step (it/s) | CTM coefficients ms/step (it/s) | AP it/s ÷ CTM it/s (target ≥ 0.97) |")
    print("|---|---|---|---|")
    for res in results:
        ap, ctm = res["ms"]["analytic"], res["ms"]["ctm"]
        print(f"| {res['preset']} | {ap:.1f} ({1e3 / ap:.2f}) | {ctm:.1f} ({1e3 / ctm:.2f}) | {fmt(res['ap_over_ctm'])} |")


if __name__ == "__main__":
    main()
