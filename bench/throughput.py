"""Training-step throughput: what Analytic-Precond costs per step, against CTM's closed-form coefficients.

Both runs use the same preset, seed and batch; only `precond.kind` differs. Both variants look
their (f, g) up in the same on-device table of grid pairs (computed once at start-up), so the step
costs should be equal; the two variants run one after the other (for an interleaved, per-pass
measurement see bench/step_cost.py). Timed per step: the objective (one k per step from the step's
shared generator, as in training), backward and the optimizer step. Also measured: the exact
class-conditional teacher's denoiser per class (K/C components per sample) against the same
mixture evaluated over all components (its reference).

    python bench/throughput.py                 # toy2d and digits, 200 timed steps each
"""

from __future__ import annotations

import argparse
import time

import torch


def steps_per_second(preset: str, kind: str, steps: int, warmup: int) -> float:
    from apctl.presets import load_config
    from apctl.training.run import prepare
    from apctl.training.step import shared_generator

    cfg, _ = load_config(preset, [f'precond.kind="{kind}"', "precond.statistics.n_samples=512",
                                  "training.eval_every=0", "run.threads=1"])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(cfg, tmp)
        gen = torch.Generator().manual_seed(0)
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            x0, labels = run.data_source.sample(cfg.training.batch_size, gen)
            loss, _ = run.objective(run.student, run.target, x0, labels, gen, shared_generator(cfg.run.seed, i))
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
        return steps / (time.perf_counter() - start)


def teacher_calls_per_second(conditional: bool, calls: int = 50) -> float:
    from apctl.presets import load_config
    from apctl.data.sources import load_training_data
    from apctl.teachers import build_teacher

    cfg, _ = load_config("digits")
    teacher = build_teacher(cfg.teacher, load_training_data(cfg.data))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, *teacher.shape, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.randn(256, generator=gen, dtype=torch.float64))
    labels = torch.nn.functional.one_hot(torch.arange(256) % 10, 10) if conditional else None
    start = time.perf_counter()
    for _ in range(calls):
        teacher(x, sigma, labels)
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["toy2d", "digits"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("# bench/throughput.py (1 thread)")
    print("preset | CTM precond it/s | Analytic-Precond it/s | ratio AP/CTM")
    for preset in args.presets:
        ctm = steps_per_second(preset, "ctm", args.steps, args.warmup)
        ap = steps_per_second(preset, "analytic", args.steps, args.warmup)
        print(f"{preset} | {ctm:.1f} | {ap:.1f} | {ap / ctm:.3f}")
    full, per_class = teacher_calls_per_second(False), teacher_calls_per_second(True)
    print("digits teacher, batch 256 | all 1797 components calls/s | per-class components calls/s | ratio")
    print(f"digits | {full:.1f} | {per_class:.1f} | {per_class / full:.2f}")


if __name__ == "__main__":
    main()
