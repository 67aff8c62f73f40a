"""What each objective kind needs from the run, as predicates of its `[objective]` section (no objective is
built here, so that the builders and the plan can ask without importing one another)."""

from apctl.config import ObjectiveConfig


def distills(cfg: ObjectiveConfig) -> bool:
    """Whether the objective trains a few-step student (two-time network, preconditioning, the
    alignment probe against the teacher's ODE): CTM, CD, ECT and iSD (which trains from data alone; its
    teacher serves the probe only); EDM's denoiser loss (`apctl teacher train`) does not."""
    return cfg.kind in ("ctm", "cd", "ect", "isd")


def uses_target(cfg: ObjectiveConfig) -> bool:
    """Whether the objective keeps a target network θ⁻ (an EMA of θ at objective.target_ema): CTM and
    CD do; ECT's and iSD's goals come from the current θ without gradient, and EDM's loss has none."""
    return cfg.kind in ("ctm", "cd")


def one_time(cfg: ObjectiveConfig) -> bool:
    """Whether the objective trains a one-time denoiser D_θ(x, t) in the two-time student (ECT): the run
    freezes the student's s-embedding at zero, so D_θ(x, t, s) does not depend on s."""
    return cfg.kind == "ect"


def uses_distance(cfg: ObjectiveConfig) -> bool:
    """Whether the objective compares two outputs with `[objective.distance]` (L2, pseudo-Huber, LPIPS): CTM and
    CD do; ECT's and iSD's losses are set in their own sections, and EDM's is its weighted L2."""
    return cfg.kind in ("ctm", "cd")
