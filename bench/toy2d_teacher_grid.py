"""The teacher's own few-level samplers on toy2d's probe: what "the teacher's beyond-3σ fraction" can mean.

Issue 9 item 8 sets the 2-step student's target at 1.5× "the teacher's" fraction of samples beyond 3σ of a
mode. The teacher is exact, so its figure depends only on the sampler: its Heun chain along N Karras
levels σ_max → σ_min (`apctl.sampling.teacher_sample` with N − 1 steps: 2(N − 1) evaluations). N = 18 is
EDM's default sampler (and CTM's CIFAR-10 grid), N = 26 the grid toy2d's CTM distils on, N = 257 the
reference the probe scores against (`eval.teacher_steps` = 256). For each N this prints one JSON row on the
run's own probe (`eval.seed`, `--n` noises): the chain's alignment RMS to the reference and its fraction
beyond 3σ (`apctl/metrics/mode_outliers.py`), next to the reference's and the exact law's.

    OMP_NUM_THREADS=1 python bench/toy2d_teacher_grid.py                      # N = 18 22 26 30 50, 8,192 noises
    OMP_NUM_THREADS=1 python bench/toy2d_teacher_grid.py --levels 18 --n 2048
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy2d")
    ap.add_argument("--levels", type=int, nargs="+", default=[18, 22, 26, 30, 50], help="Karras levels N of each chain")
    ap.add_argument("--n", type=int, default=8192, help="probe noises (8,192: a 1.5%% fraction ±0.13%%)")
    args = ap.parse_args()

    import torch

    from apctl.metrics.alignment import AlignmentProbe
    from apctl.presets import load_config
    from apctl.sampling import teacher_sample
    from apctl.teachers import build_teacher

    torch.set_num_threads(1)
    cfg, _ = load_config(args.preset)
    teacher = build_teacher(cfg.teacher)
    probe = AlignmentProbe(teacher, teacher.shape, args.n, cfg.eval.seed, cfg.eval.teacher_steps)
    for levels in args.levels:
        chain = teacher_sample(teacher, probe.z, levels - 1)
        measured = probe.measure(chain)
        print(json.dumps({"preset": args.preset, "n": args.n, "probe_seed": cfg.eval.seed, "levels": levels,
                          "nfe": 2 * (levels - 1), "alignment_rms": measured["alignment_rms"],
                          "beyond_3sigma": measured["beyond_3sigma"],
                          "reference_levels": cfg.eval.teacher_steps + 1, **probe.beyond_3sigma}), flush=True)


if __name__ == "__main__":
    main()
