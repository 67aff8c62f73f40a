"""Training objectives: one callable object per method,
`objective(student, target, x0, labels, gen, shared_gen, step) -> (loss, logs)`; `step` (the
iteration, 0-based) matters only to objectives whose law changes over the run (ECT's stages)."""

from apctl.objectives.consistency import CDObjective, CTMObjective, build_objective
from apctl.objectives.kinds import distills, one_time, uses_distance, uses_target


__all__ = ["CDObjective", "CTMObjective", "build_objective", "distills", "one_time", "uses_distance", "uses_target"]
