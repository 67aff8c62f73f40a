"""What toy2d's student network can learn at all in the preset's budget: direct regression onto the ODE map.

Issue 9 item 8 asks the default's 2-step student for ≤ 1.5× the teacher ODE's fraction of samples beyond
3σ of a mode, in about two minutes on a CPU. Distillation learns the few-step map only through
bootstrapped targets. This script removes every difficulty of distillation and asks how close the
same network gets with the answer given: the 1-step map

    z ↦ x*(z) = ODE_{σ_max → σ_min}(σ_max·z)       (the teacher's Heun chain of `--target-steps` steps)

is regressed directly, D_θ(σ_max·z, σ_max, σ_min) ≈ x*(z) in squared L2, on fresh z every step, with
the preset's network (`[student]`), batch, iteration count, optimizer and lr (cosine decay to 0). The
result is scored on the run's own probe (`eval.seed`, 8,192 noises, the 256-step ODE reference), as
`bench/toy2d_default.py` scores a distilled student. Whatever this regression cannot reach, CTM with
the same network and budget cannot either: its targets are worse than x*.

`--input-gain G` sets the MLP's fixed gain on its input c_in·x (`student.input_gain`, networks/mlp.py);
with Fourier features the gain scales them too (they are part of the network's input), so the Fourier
rows of docs/benchmarks.md are reproduced with `--input-gain 1`.
`--fourier F --fourier-scale S` appends random Fourier features of the network input
(Tancik et al. 2020; φ(u) = [cos 2πBu, sin 2πBu], B ~ N(0, S²)), a sharper embedding of x that apctl's
MLP does not have: tried here because the student's excess off-mode samples are bridges between
neighbouring modes (the map's region boundaries drawn too smoothly), not noise.

    OMP_NUM_THREADS=1 python bench/toy2d_ceiling.py                                  # the preset as is
    OMP_NUM_THREADS=1 python bench/toy2d_ceiling.py --fourier 128 --fourier-scale 5 --iterations 8400 --input-gain 1
    OMP_NUM_THREADS=1 python bench/toy2d_ceiling.py --input-gain 1                 # the MLP before the gain
    OMP_NUM_THREADS=1 python bench/toy2d_ceiling.py --set 'training.optimizer="radam"' --set 'training.betas=[0.9, 0.999]'

`--set KEY=VALUE` overrides the preset as `apctl distill --set` does (the rows of docs/benchmarks.md before
the seventh session were measured under RAdam with β = (0.9, 0.999), the preset's optimizer then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy2d")
    ap.add_argument("--iterations", type=int, default=0, help="default: the preset's training.iterations")
    ap.add_argument("--lr", type=float, default=0.0, help="default: the preset's training.lr")
    ap.add_argument("--hidden", type=int, default=0, help="default: the preset's student.hidden")
    ap.add_argument("--input-gain", type=float, default=0.0, help="default: the preset's student.input_gain")
    ap.add_argument("--target-steps", type=int, default=48, help="Heun steps of the regression targets")
    ap.add_argument("--fourier", type=int, default=0, help="random Fourier features of the input (0 = none)")
    ap.add_argument("--fourier-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    import torch

    from apctl.metrics.alignment import AlignmentProbe
    from apctl.networks.mlp import TwoTimeMLP
    from apctl.presets import load_config
    from apctl.sampling import teacher_sample
    from apctl.schedules import SIGMA_MAX, SIGMA_MIN
    from apctl.teachers import build_teacher
    from apctl.training.optimizer import build_optimizer
    from apctl.training.schedule import learning_rate, set_learning_rate

    torch.set_num_threads(1)
    cfg, _ = load_config(args.preset, args.overrides)
    st, tc = cfg.student, cfg.training
    iterations, lr, hidden = args.iterations or tc.iterations, args.lr or tc.lr, args.hidden or st.hidden
    gain = args.input_gain or st.input_gain
    teacher = build_teacher(cfg.teacher)
    dim = teacher.components()[0].shape[1]
    torch.manual_seed(args.seed)
    net = TwoTimeMLP((dim + args.fourier,), 0, hidden, st.depth, st.embed_dim, input_gain=gain)
    B = args.fourier_scale * torch.randn(args.fourier // 2, dim, generator=torch.Generator().manual_seed(args.seed))

    def predict(z: torch.Tensor) -> torch.Tensor:
        """D_θ(σ_max·z, σ_max, σ_min); with Fourier features the network sees [x, σ_max·φ(z)] (φ of
        c_in·x ≈ z), and its c_skip·x path is ≈ 0 at σ_max either way."""
        x = SIGMA_MAX * z
        if args.fourier:
            angle = 2 * math.pi * z @ B.T
            x = torch.cat([x, SIGMA_MAX * torch.cat([angle.cos(), angle.sin()], dim=1)], dim=1)
        t, s = torch.full((len(z),), SIGMA_MAX), torch.full((len(z),), SIGMA_MIN)
        return net(x, t, s)[:, :dim]

    # The preset's optimizer; its lr decayed by apctl's own cosine schedule (training/schedule.py) to 0.
    schedule = dataclasses.replace(tc, iterations=iterations, lr=lr, lr_schedule="cosine", lr_warmup=0, lr_floor=0.0)
    optimizer = build_optimizer(tc, net.parameters(), lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    started = time.process_time()
    for k in range(iterations):
        set_learning_rate(optimizer, learning_rate(schedule, k))
        z = torch.randn(tc.batch_size, dim, generator=gen)
        with torch.no_grad():
            target = teacher_sample(teacher, z, args.target_steps)
        loss = (predict(z) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cpu = time.process_time() - started

    probe = AlignmentProbe(teacher, (dim,), 8192, cfg.eval.seed, cfg.eval.teacher_steps)
    with torch.no_grad():
        out = torch.cat([predict(z) for z in probe.z.split(2048)])
        chain = teacher_sample(teacher, probe.z, args.target_steps)
    row = {"preset": args.preset, "sets": args.overrides, "optimizer": type(optimizer).__name__, "betas": list(optimizer.defaults["betas"]),
           "iterations": iterations, "batch": tc.batch_size, "lr": lr, "hidden": hidden, "input_gain": gain,
           "depth": st.depth, "fourier": args.fourier, "fourier_scale": args.fourier_scale, "seed": args.seed,
           "cpu_s": round(cpu, 1), "regression": probe.measure(out),
           "targets_vs_reference": probe.measure(chain), "teacher_ode_beyond_3sigma": probe.beyond_3sigma}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
