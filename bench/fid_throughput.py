"""FID throughput on this machine: images/s of generation and of the Inception network, measured separately.

Generation is `apctl.generation` as `apctl eval --fid` runs it (image i from seed i, noise and labels
drawn per seed on the CPU): the student at NFE 1 and 2 (CTM coefficients; random weights — the cost
does not depend on them) and the teacher's row, EDM's sampler with 18 levels (35 NFE), for

  * digits-img: the cpu-songunet-16 student (1×16×16, 10 classes) and the exact empirical-mixture teacher;
  * cifar10:    the cifar10-cond student architecture (EDM's DDPM++ 32×32, 56M parameters, random weights),
                whose teacher row costs 35 of its evaluations per image (reported as NFE-1 time × 35).

Inception: torch-fidelity's InceptionV3 on uint8 images (every input is resized to 299², so the cost
does not depend on the image size), batch `--batch`. Timings exclude the first (warm-up) batch.

    OMP_NUM_THREADS=1 python bench/fid_throughput.py                       # 16 images per measurement
    OMP_NUM_THREADS=1 python bench/fid_throughput.py --images 64 --batch 32
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, seeds: list[int], batch: int) -> float:
    """Images/s of fn(seeds) over `seeds` in batches, after one warm-up batch."""
    fn(seeds[:batch])
    start = time.perf_counter()
    for a in range(0, len(seeds), batch):
        fn(seeds[a:a + batch])
    return len(seeds) / (time.perf_counter() - start)


def student_makers(preset: str):
    from apctl.generation import StudentImages
    from apctl.networks.registry import EDM_PRESET_KWARGS, build_network
    from apctl.networks.student import build_student, student_architecture
    from apctl.preconditioning.coefficients import CTMPrecond
    from apctl.presets import load_config

    cfg, _ = load_config(preset, ['precond.kind="ctm"'])
    torch.manual_seed(0)
    if cfg.student.init_from_teacher:          # the paper presets: the teacher's architecture, built without its pickle
        kwargs = EDM_PRESET_KWARGS[cfg.student.network]
        net = build_network("EDMPrecond", kwargs)
        shape, label_dim = (net.img_channels, net.img_resolution, net.img_resolution), net.label_dim
    else:
        shape, label_dim = (1, cfg.data.resolution, cfg.data.resolution), 10 if cfg.data.class_conditional else 0
        net = None
    arch = student_architecture(cfg.student, shape, label_dim, net)
    student = build_student(arch, net).eval().requires_grad_(False)
    makers = {f"student NFE {n}": StudentImages(student, CTMPrecond(), sigmas, 0.0, shape, label_dim)
              for n, sigmas in ((1, [80.0, 0.002]), (2, [80.0, 2.515, 0.002]))}
    params = sum(p.numel() for p in student.parameters())
    return cfg, makers, shape, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per measurement (default 16)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from apctl.generation import TeacherEDMImages
    from apctl.metrics.inception import load_inception

    seeds = list(range(args.images))
    rows = []
    for preset in ("digits-img", "cifar10-cond"):
        cfg, makers, shape, params = student_makers(preset)
        for name, maker in makers.items():
            rows.append((preset, f"{name} ({params / 1e6:.2f}M params)", timed(maker, seeds, args.batch)))
        if preset == "digits-img":
            from apctl.data.sources import load_training_data
            from apctl.teachers import build_teacher

            teacher = build_teacher(cfg.teacher, load_training_data(cfg.data))
            maker = TeacherEDMImages(teacher, 18, shape, 10)
            rows.append((preset, "teacher EDM sampler, 35 NFE (exact mixture)", timed(maker, seeds[:8], 4)))
        else:
            nfe1 = rows[-2][2]
            rows.append((preset, "teacher EDM sampler, 35 NFE (estimate: NFE-1 rate / 35)", nfe1 / 35))
    detector = load_inception()
    for preset, shape in (("digits-img", (1, 16, 16)), ("cifar10-cond", (3, 32, 32))):
        images = torch.randint(0, 256, (args.images, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        rate = timed(lambda s: detector.features(images[s[0]:s[-1] + 1], args.batch), seeds, args.batch)
        rows.append((preset, f"Inception-v3 pool3 ({detector.source}), {shape[1]}² → 299²", rate))
    import os

    print(f"{args.images} images per measurement, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| data | what | images/s | s per 50k images |")
    print("|---|---|---|---|")
    for preset, what, rate in rows:
        print(f"| {preset} | {what} | {rate:.3g} | {50000 / rate:,.0f} |")


if __name__ == "__main__":
    main()
