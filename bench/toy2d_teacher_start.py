"""toy2d with a student that starts from the teacher: does the paper's setting help the 2-minute default?

The paper distils a student initialised from the teacher network; toy2d's student starts from scratch,
because its teacher is the exact denoiser of a Gaussian mixture, not a network whose weights could be
copied. This script gives the preset's CTM run the closest thing: a student that is the teacher plus a
learned correction,

    D_θ(x, t, s) = D_teacher(x, t) + c_out(t)·F_θ(g·c_in(t)·x, c_noise(t), c_noise(s)),

F_θ the preset's MLP (`apctl/networks/mlp.py`, its last layer zero at the start), so that at step 0
D_θ = D_teacher for every s and the student's jumps are the preconditioning's first-order steps on the
exact denoiser. Everything else is the preset's `apctl distill` (objective, budget, EMA, probe); the
student is swapped in through `apctl.networks.student.build_student`, in this process, and scored as
`bench/toy2d_default.py` scores the shipped one (the final evaluation-EMA student, 8,192 noises).

    python bench/toy2d_teacher_start.py --seeds 0 1 2
    python bench/toy2d_teacher_start.py --seeds 0 --set student.input_gain=1
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent


class TeacherPlusCorrection(nn.Module):
    """D_θ(x, t, s) = D_teacher(x, t) + (mlp(x, t, s) − c_skip(t)·x): the MLP's own skip term is replaced by
    the teacher, its c_out·F_θ kept (module docstring). Only F_θ's weights are parameters."""

    def __init__(self, mlp: nn.Module, teacher):
        super().__init__()
        self.mlp = mlp
        self.teacher = teacher

    def output_weight(self) -> nn.Parameter:
        return self.mlp.output_weight()

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        from apctl.schedules import c_skip

        per_sample = (-1,) + (1,) * (x.dim() - 1)
        teacher = self.teacher(x, t.reshape(-1), labels).to(x.dtype)
        return teacher + self.mlp(x, t, s, labels) - c_skip(t.float().reshape(per_sample), self.mlp.sigma_data) * x


def student_from_teacher(teacher):
    """A context inside which every student apctl builds (`apctl.networks.student.build_student`, which the
    run and the trained-student loader import when they start) is `TeacherPlusCorrection` around the MLP
    it would be."""
    import apctl.networks.student as student

    build = student.build_student
    return mock.patch.object(student, "build_student",
                             lambda arch, teacher_network=None: TeacherPlusCorrection(build(arch, teacher_network), teacher))


def main() -> None:
    sys.path.insert(0, str(BENCH))
    from toy2d_default import distill_in_process, evaluate, run_arguments

    args = run_arguments(__doc__.splitlines()[0]).parse_args()

    from apctl.presets import load_config
    from apctl.teachers import build_teacher

    cfg, _ = load_config(args.preset)
    if cfg.teacher.kind != "gmm" or cfg.student.kind != "mlp":
        raise SystemExit(f"toy2d_teacher_start: {args.preset} needs a Gaussian-mixture teacher and an MLP student")
    # Built here, not in the builder: the builder also runs on the meta device (parameter counts).
    teacher = build_teacher(cfg.teacher)
    print(f"# {args.preset} student = teacher + correction {' '.join(args.overrides)}", flush=True)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp, student_from_teacher(teacher):
            out = Path(tmp) / f"{args.preset}-seed{seed}"
            cpu = distill_in_process(args.preset, seed, args.overrides, out)
            row = {"preset": args.preset, "student": "teacher + correction", "seed": seed, "sets": args.overrides,
                   "cpu_s": round(cpu, 1)} | evaluate(out, args.n)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
