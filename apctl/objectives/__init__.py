"""Training objectives: one callable object per method, `objective(student, target, x0, labels, gen)`."""

from apctl.objectives.consistency import CDObjective, CTMObjective, build_objective

__all__ = ["CDObjective", "CTMObjective", "build_objective"]
