"""toy2d's CTM run with its bootstrapped goal replaced by the exact ODE value: what the budget leaves.

Issue 9 item 8 asks the default's 2-step student for ≤ 1.5× the teacher ODE's fraction of samples beyond
3σ of a mode. `bench/toy2d_ceiling.py` regresses the one 1-step map z ↦ ODE(80·z) directly; this script
asks the next question: how much of the distilled student's remaining error is CTM's bootstrapping, and
how much is the budget spread over every (t, s) map CTM trains? It runs the preset's own `apctl distill`
(every key: the network, the index law, DSM term and adaptive weight, optimizer, schedule, EMA, budget)
with one part swapped, the consistency term (apctl/objectives/consistency.py):

    CTM:        d(G_θ⁻(G_θ(x_t, t, s), s, σ_min),  G_θ⁻(G_θ̄(x̂_u, u, s), s, σ_min))
    here:       d(G_θ(x_t, t, s),  Φ(x_t; t → s))

Φ is the teacher's Heun chain from t = t_i to s = t_j on a Karras grid `--sub` times finer than the run's
(its every `sub`-th level is a level of the run's grid; sub = 4 on toy2d's 26 levels: 101 levels,
up to 100 steps). Every map CTM trains is given its answer, at the same (i, j) draws, so the gap
between this run and the shipped one is what bootstrapping costs, and the gap between this run and the
teacher is what the network and the budget leave. It scores the final evaluation-EMA student as
`bench/toy2d_default.py` does (8,192 probe noises, 1 and 2 steps).

    python bench/toy2d_exact_goal.py --seeds 0 1 2
    python bench/toy2d_exact_goal.py --seeds 0 --set training.iterations=5600

A step costs ≈ 3× the shipped one (the longer chain); the CPU time is reported, the iteration budget
is the preset's.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

BENCH = Path(__file__).resolve().parent


@torch.no_grad()
def exact_goal(denoise, x: torch.Tensor, fine: torch.Tensor, start: torch.Tensor, stop: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Φ(x; fine[start] → fine[stop]) per row: Heun steps along `fine` (decreasing σ; apctl's `heun_chain`),
    rows that have arrived keep their value. `start`, `stop` are per-row level indices with start ≤ stop."""
    from apctl.sampling import heun_chain

    steps = stop - start
    return heun_chain(denoise, x, fine, start, int(steps.max()), steps, labels)


def with_exact_goal(objective, sub: int):
    """`objective` (the run's CTMObjective) with its consistency term regressing onto Φ along a grid `sub`
    times finer than the run's (module docstring); everything else, the draws included, is CTM's."""
    from apctl.objectives.consistency import CTMObjective
    from apctl.preconditioning.table import jump_on_grid
    from apctl.schedules import karras_sigmas

    class ExactGoalCTM(CTMObjective):
        def consistency(self, student, target, x0, labels, draws, shared_gen):
            x_t, i, _, j, _ = self.draw_start(x0, draws, shared_gen)          # CTM's (i, k, j) law and x_t
            goal = exact_goal(self._teacher, x_t, fine.to(x0.device), sub * i, sub * j, labels)
            return self.distance(jump_on_grid(self.table, student, x_t, i, j, labels), goal).mean()

    if type(objective) is not CTMObjective:
        raise SystemExit(f"toy2d_exact_goal: the preset's objective is {type(objective).__name__}, not CTM's")
    fine = torch.as_tensor(karras_sigmas(sub * (len(objective.grid) - 1) + 1))   # its every sub-th level is the run's
    objective.__class__ = ExactGoalCTM
    return objective


def exact_goal_objective(sub: int):
    """A context inside which the objective every run builds (`apctl.objectives.build_objective`, which
    apctl/training/run.py imports when the run starts) is CTM's with the exact goal (`with_exact_goal`)."""
    import apctl.objectives as objectives

    build = objectives.build_objective
    return mock.patch.object(objectives, "build_objective",
                             lambda cfg, teacher, precond: with_exact_goal(build(cfg, teacher, precond), sub))


def main() -> None:
    sys.path.insert(0, str(BENCH))
    from toy2d_default import distill_in_process, evaluate, run_arguments

    parser = run_arguments(__doc__.splitlines()[0])
    parser.add_argument("--sub", type=int, default=4, help="levels of the goal's grid per level of the run's")
    args = parser.parse_args()
    print(f"# {args.preset} exact goal (sub {args.sub}) {' '.join(args.overrides)}", flush=True)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{args.preset}-seed{seed}"
            with exact_goal_objective(args.sub):
                cpu = distill_in_process(args.preset, seed, args.overrides, out)
            row = {"preset": args.preset, "objective": "ctm, exact goal", "sub": args.sub, "seed": seed,
                   "sets": args.overrides, "cpu_s": round(cpu, 1)} | evaluate(out, args.n)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
