"""iSD's training guidance on a class-conditional ring: does w > 1 put more 2-step samples in their class?

The toy2d ring with classes (adjacent modes paired: modes 2c and 2c + 1 are class c) and
`data.class_conditional = true`. For each w, `apctl distill --preset toy2d-isd --set objective.isd.guidance=w`
trains a flow map (10% of each batch without a class, as iSD's code trains), then 2-step samples are drawn
for every class from the same noise (`apctl sample --nfe 2`, classes cycling) and each sample is given the
class of its nearest mode (Mahalanobis, the mixture's own σ). Printed per w: the share of samples in their
requested class, and the share beyond 3σ of every mode (`apctl.metrics.mode_outliers`). The guided flow is
not the teacher's conditional ODE, so no alignment figure is printed: guidance is meant to leave it.

    python bench/isd_guidance.py --guidance 1 2 4 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLASSES = "teacher.classes=[0,0,1,1,2,2,3,3]"


def run(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "apctl.cli.main", *args], env=env, check=True, stdout=subprocess.DEVNULL)


def class_shares(npz: Path, means: np.ndarray, std: float, classes: np.ndarray) -> tuple[float, float]:
    """(share of samples whose nearest mode is of their class, share beyond 3σ of every mode)."""
    with np.load(npz) as f:
        x, labels = f["samples"], f["labels"]
    distance = np.linalg.norm(x[:, None, :] - means[None], axis=2) / std       # in units of the modes' σ
    nearest = distance.argmin(1)
    return float((classes[nearest] == labels).mean()), float((distance.min(1) > 3).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=4096, help="2-step samples per run (classes cycling)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from apctl.presets import load_config

    cfg, _ = load_config("toy2d-isd", [CLASSES, "data.class_conditional=true"])
    means, std = np.asarray(cfg.teacher.means), float(cfg.teacher.stds)
    classes = np.asarray(cfg.teacher.classes)
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.guidance:
            for seed in args.seeds:
                out = Path(tmp) / f"w{w}-s{seed}"
                sets = [CLASSES, "data.class_conditional=true", f"objective.isd.guidance={w}", f"run.seed={seed}",
                        "run.threads=1", *args.overrides]
                run(["distill", "--preset", "toy2d-isd", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
                run(["sample", "--ckpt", str(out), "--nfe", "2", "--n", str(args.n), "--out", str(out / "s.npz")])
                in_class, beyond = class_shares(out / "s.npz", means, std, classes)
                print(json.dumps({"guidance": w, "seed": seed, "sets": args.overrides, "in_class": in_class,
                                  "beyond_3sigma": beyond}), flush=True)


if __name__ == "__main__":
    main()
