"""The teacher's row: FID of a teacher's EDM-sampler samples against the real data (issue 8, digits-teacher).

N samples of the teacher with EDM's deterministic sampler (18 Karras levels then an Euler step to σ = 0,
35 network evaluations; classes cycling 0–9 from fixed noise) against the N real images of the data set
(Inception pool3 features, Fréchet distance; for digits N = 1,797, every image). Also printed: the FID of
one half of the real digits against the other (a floor for this data set and sample size) and the time.

    OMP_NUM_THREADS=1 python bench/teacher_fid.py                       # teachers/digits-teacher.safetensors
    OMP_NUM_THREADS=1 python bench/teacher_fid.py --n 512 --set teacher.file="runs/digits-teacher/teacher.safetensors"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acceleration_network import build_parts, fid_noise, teacher_edm_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits-net", help="a preset naming the teacher and the data (default digits-net)")
    parser.add_argument("--n", type=int, default=0, help="samples and real images (default 0 = every real image)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from apctl.metrics.fid import compute_fid, compute_reference_stats
    from apctl.presets import load_config

    cfg, _ = load_config(args.preset, args.overrides + ["run.threads=1"])
    teacher, data, source = build_parts(cfg)
    real = data.to_tensor()
    n = min(args.n or len(real), len(real))
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[:n]]
    started = time.perf_counter()
    z, labels = fid_noise(n, source.shape, source.label_dim, args.seed)
    samples = teacher_edm_samples(teacher, z, labels)
    sampled = time.perf_counter()
    reference = compute_reference_stats(real)
    fid = compute_fid(samples.clamp(-1, 1), reference)["fid"]
    half = n // 2
    floor = compute_fid(real[:half], compute_reference_stats(real[half:2 * half]))["fid"]
    done = time.perf_counter()
    print(f"teacher {teacher.fingerprint()[:16]} ({cfg.teacher.file}), {n} samples (35 NFE) vs {n} real images")
    print("| teacher | NFE | FID vs real | real half vs real half | samples | seconds (sampling / Inception) |")
    print("|---|---|---|---|---|---|")
    print(f"| {Path(cfg.teacher.file).name} | 35 | {fid:.2f} | {floor:.2f} ({half} vs {half}) | {n} | "
          f"{sampled - started:.0f} / {done - sampled:.0f} |")


if __name__ == "__main__":
    main()
