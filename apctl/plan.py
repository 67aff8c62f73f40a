"""The resolved plan of a distillation run, described without loading teacher or data files (`--dry-run`)."""

from __future__ import annotations

import os
from pathlib import Path

from apctl.config import Config


def _student_parameters(cfg: Config, shape, label_dim: int) -> tuple[str, int | None]:
    """The student `prepare` would build (a teacher-initialised one takes its preset network's shape)."""
    import torch

    from apctl.networks.registry import count_parameters
    from apctl.networks.student import build_student, student_architecture

    arch = student_architecture(cfg.student, shape, label_dim)
    if arch["kind"] == "mlp":
        return f"TwoTimeMLP {cfg.student.depth}×{cfg.student.hidden}", count_parameters(build_student(arch))
    with torch.device("meta"):
        net = build_student(arch)
    if arch["kind"] == "denoiser":
        name = f"EDMPrecond/{arch['init_kwargs']['model_type']} ({cfg.student.network}, resized to the data)"
        return f"{name}: {count_parameters(net):,} parameters", count_parameters(net)
    teacher_part = count_parameters(net.net)
    name = f"TwoTimeDenoiser(EDMPrecond/{arch['init_kwargs']['model_type']}, {cfg.student.network})"
    return f"{name}: {teacher_part:,} teacher + {count_parameters(net) - teacher_part:,} s-embedding", count_parameters(net)


def data_shape(cfg: Config) -> tuple[tuple[int, ...], int]:
    """(per-sample shape, label dim) implied by the config, without reading data files."""
    from apctl.networks.registry import EDM_PRESET_KWARGS

    t, d = cfg.teacher, cfg.data
    if t.kind == "gmm":
        labels = (max(t.classes) + 1) if (t.classes and d.class_conditional) else 0
        return (len(t.means[0]),), labels
    if d.kind == "digits":
        return (1, d.resolution, d.resolution), 10 if d.class_conditional else 0
    k = EDM_PRESET_KWARGS.get(cfg.student.network, {})
    return (k.get("img_channels", 3), k.get("img_resolution", d.resolution), k.get("img_resolution", d.resolution)), \
        (k.get("label_dim", 0) if d.class_conditional else 0)


def _dropout(cfg: Config) -> str:
    """The dropout rate the student trains with (θ and θ⁻ passes run in train mode)."""
    from apctl.networks.registry import EDM_PRESET_KWARGS

    if cfg.student.dropout >= 0:
        return f"{cfg.student.dropout:g} (student.dropout)"
    if cfg.student.kind == "mlp":
        return "none (MLP)"
    rate = EDM_PRESET_KWARGS.get(cfg.student.network, {}).get("dropout")
    return "the architecture's own" + (f" ({rate:g})" if rate is not None else "")


def describe_plan(cfg: Config, preset_path: Path, out: Path) -> list[tuple[str, str]]:
    from apctl.schedules import karras_sigmas

    shape, label_dim = data_shape(cfg)
    student, _ = _student_parameters(cfg, shape, label_dim)
    t, d, o, tr, p = cfg.teacher, cfg.data, cfg.objective, cfg.training, cfg.precond
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.kind == "network":
        from apctl.errors import ApctlError
        from apctl.teachers import find_teacher_file

        try:
            teacher = f"EDM network from {find_teacher_file(t.file)} (found)"
        except ApctlError:
            teacher = f"EDM network from {t.file or '(unset)'} (NOT FOUND — pass --teacher FILE or see $APCTL_TEACHERS)"
    elif t.kind == "empirical":
        teacher = f"exact empirical mixture over {d.kind} (bandwidth {t.bandwidth})"
    elif t.kind == "none":
        teacher = "none: this run trains one (EDM's loss); the EMA is written as RUN/teacher.safetensors"
    else:
        teacher = f"exact Gaussian mixture, {len(t.means)} components in {len(t.means[0])}-D"
    if d.kind == "teacher":
        data = "exact samples of the teacher"
    else:
        data = f"{d.kind} {d.path or ''}".strip() + f" ({'x-flip, ' if d.xflip else ''}{'class-conditional' if d.class_conditional else 'unconditional'})"
    grid = karras_sigmas(o.grid_points)
    c = o.ctm
    distance = o.distance.kind + (f" ({o.distance.lpips_net}, {o.distance.lpips_pooling} pooling)" if o.distance.kind == "lpips" else "")
    precond = {"analytic": f"Analytic-Precond ({p.form} form, {p.statistics.n_points} λ-points × "
                           f"{p.statistics.n_samples} samples)", "ctm": "CTM (s/t, 1 − s/t)",
               "cm": "CM (c_skip/c_out with ε)"}[p.kind]
    rows = [
        ("preset", str(preset_path)),
        ("output", str(out)),
        ("teacher", teacher),
        ("dataset", data),
        ("data shape", f"{tuple(shape)}, {label_dim or 'no'} classes"),
        ("student" if o.kind != "edm" else "network", student),
        ("dropout", _dropout(cfg)),
    ]
    if o.kind == "edm":
        rows.append(("objective", f"EDM denoiser loss, ln σ ~ N({o.edm.p_mean:g}, {o.edm.p_std:g}²), "
                                  "weight (σ² + σ_d²)/(σ·σ_d)²"))
    else:
        rows += [
            ("objective", f"{o.kind.upper()}, distance {distance}"),
            *([("CTM rules", f"teacher steps {c.teacher_steps_law} (≤ {c.max_teacher_steps}), DSM weight "
                             f"{'adaptive' if c.dsm_weighting == 'adaptive' else c.dsm_weight}, DSM σ {c.dsm_sigma_law}"
                             f"{f' ({c.dsm_uniform_fraction:g} uniform)' if c.dsm_sigma_law == 'halflognormal' else ''}, "
                             f"target inner jump by the {'current θ (no grad)' if c.target_inner == 'student' else 'EMA θ⁻'}")]
              if o.kind == "ctm" else []),
            ("preconditioning", precond),
            ("grid", f"N = {o.grid_points} Karras levels, {grid[0]:g} … {grid[-1]:g}"),
            ("max teacher Heun steps", str(o.ctm.max_teacher_steps if o.kind == "ctm" else 1)),
            ("sampler σ list", "Karras levels (CTM's exact sampler)" if cfg.eval.sigmas == "karras" else "Karras levels snapped to the grid"),
            ("target EMA μ", f"{o.target_ema:g}"),
        ]
    rows += [
        ("optimizer", f"{tr.optimizer}, lr {tr.lr:g}" + _lr_schedule(tr)),
        ("evaluation EMA", f"{tr.ema_decay:g}"),
        ("iterations", f"{tr.iterations:,}"),
        ("precision", tr.precision),
        ("batch", _batch(tr, world)),
    ]
    return rows


def _lr_schedule(tr) -> str:
    warm = f", warm-up {tr.lr_warmup:,} steps" if tr.lr_warmup else ""
    decay = f", {tr.lr_schedule} decay to {tr.lr_floor:g}·lr" if tr.lr_schedule != "constant" else ""
    return warm + decay


def _batch(tr, world: int) -> str:
    share = tr.batch_size // world
    line = f"{tr.batch_size} global = {world} device(s) × {share} per device"
    if 0 < tr.batch_per_device < share:
        line += f", accumulated over {share // tr.batch_per_device} micro-batches of {tr.batch_per_device}"
    return line
