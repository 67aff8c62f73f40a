"""Training objectives: one callable object per method,
`objective(student, target, x0, labels, gen, shared_gen) -> (loss, logs)`."""

from apctl.config import ObjectiveConfig
from apctl.objectives.consistency import CDObjective, CTMObjective, build_objective


def distills(cfg: ObjectiveConfig) -> bool:
    """Whether the objective distils a teacher (needs teacher, target θ⁻ and preconditioning);
    EDM's denoiser loss (`apctl teacher train`) does not."""
    return cfg.kind in ("ctm", "cd")


__all__ = ["CDObjective", "CTMObjective", "build_objective", "distills"]
