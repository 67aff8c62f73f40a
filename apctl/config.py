"""One typed configuration object for a run: a dataclass per TOML table, and their validation.

`config_from_dict` writes plain data (a preset's merged layers, a checkpoint's saved config) onto
the dataclasses, checking every key against its field (unknown key, wrong type, out-of-range or
unknown choice) and then the cross-field rules of `validate`; errors name the source, the dotted key
and the reason. Finding presets and layering them (`extends`, command-line paths, `--set`) is
`apctl.presets`. Each builder takes its own section (`cfg.teacher`, `cfg.objective`, …).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from apctl.errors import ApctlError
from apctl.schedules import check_sigmas

PRESET_DIR_ENV = "APCTL_PRESETS"
# run.device and the commands' --device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# Seeds are mixed into 64-bit generator seeds (NumPy's SeedSequence takes no negative words).
MAX_SEED = 2 ** 63 - 1


def _choice(*options: str) -> dict:
    return {"choices": options}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"min": lo, "max": hi, "lo_open": lo_open}


# Upper bounds on sizes: far above any real run (EDM's ImageNet-64 trains 2048 images per step; CTM
# uses N = 40), low enough that a typo (depth = 10**23) is one error line, not minutes of allocation.
MAX_WIDTH = 65_536          # student.hidden, student.embed_dim
MAX_DEPTH = 1_024           # student.depth
MAX_BATCH = 1_048_576       # training.batch_size, precond.statistics.batch_size
MAX_SAMPLES = 100_000_000   # precond.statistics.n_samples, eval.n_samples
MAX_ITERATIONS = 1_000_000_000
MAX_GRID_POINTS = 1_000     # objective.grid_points (the coefficient table holds N(N+1)/2 pairs)
MAX_STEPS = 100_000         # eval.teacher_steps, objective.ctm.max_teacher_steps, eval.nfe entries, n_points
MAX_THREADS = 1_024
MAX_RESOLUTION = 4_096


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = field(default=0, metadata=_range(0, MAX_SEED))
    device: str = "auto"      # auto | cpu | cuda | cuda:N (checked in `validate`)
    # CPU threads for torch; 0 = auto: one thread for a CPU run of a network under 10M parameters,
    # else torch's default (apctl.threads)
    threads: int = field(default=0, metadata=_range(0, MAX_THREADS))


@dataclass
class TeacherConfig:
    """Who the student learns from.

    kind = "gmm": an exact Gaussian mixture given by `means` (K lists of d numbers), `stds` (K numbers,
    or K lists of d numbers; 0 = Dirac), `weights` (K numbers) and optional `classes` (K integers).
    kind = "empirical": the exact mixture over a data set (`[data]`), one component per example with
    isotropic std `bandwidth` (0 = the empirical distribution itself).
    kind = "network": an EDM network from `file` (EDM pickle, OpenAI ADM .pt, or apctl safetensors).
    kind = "none": no teacher (training a teacher with objective.kind = "edm" on a data set).
    """

    kind: str = field(default="gmm", metadata=_choice("gmm", "empirical", "network", "none"))
    means: list = field(default_factory=list)
    stds: Any = 0.0
    weights: list = field(default_factory=list)
    classes: list = field(default_factory=list)
    bandwidth: float = field(default=0.0, metadata=_range(0.0))
    file: str = ""


@dataclass
class DataConfig:
    """Training data x_0. kind = "teacher" draws exact samples from an analytic teacher."""

    kind: str = field(default="teacher", metadata=_choice("teacher", "digits", "cifar10", "edm", "folder"))
    path: str = ""
    resolution: int = field(default=8, metadata=_range(1, MAX_RESOLUTION))
    xflip: bool = False
    class_conditional: bool = False


@dataclass
class StudentConfig:
    """The network that trains. kind = "mlp" or "unet": a two-time student D_θ(x, t, s) for vectors or
    images; kind = "flow_map": iSD's velocity flow map F_θ(x_t, t, s) for vectors on the `transport`
    interpolant (networks/flow_map.py); kind = "denoiser": a one-time EDM denoiser D_θ(x, σ)
    (EDMPrecond around `network`), what `apctl teacher train` trains."""

    kind: str = field(default="mlp", metadata=_choice("mlp", "unet", "flow_map", "denoiser"))
    hidden: int = field(default=256, metadata=_range(1, MAX_WIDTH))
    depth: int = field(default=4, metadata=_range(1, MAX_DEPTH))
    embed_dim: int = field(default=64, metadata=_range(2, MAX_WIDTH))
    input_gain: float = field(default=1.0, metadata=_range(1e-3, 1e4))   # mlp: fixed gain on c_in·x (networks/mlp.py)
    activation: str = field(default="silu", metadata=_choice("silu", "relu"))   # mlp: the hidden units' nonlinearity
    # flow_map: x_t = (1 − t)·x_0 + t·z ("linear") | cos τ·x_0 + sin τ·z, τ = 1.57·t ("trig", TrigFlow)
    transport: str = field(default="linear", metadata=_choice("linear", "trig"))
    network: str = "tiny-songunet-16"
    init_from_teacher: bool = True
    dropout: float = field(default=-1.0, metadata=_range(-1.0, 1.0))   # < 0: the architecture's own rate


@dataclass
class StatisticsConfig:
    n_points: int = field(default=120, metadata=_range(8, MAX_STEPS))
    n_samples: int = field(default=4096, metadata=_range(1, MAX_SAMPLES))
    batch_size: int = field(default=512, metadata=_range(1, MAX_BATCH))
    seed: int = field(default=0, metadata=_range(0, MAX_SEED))
    derivative: str = field(default="jvp", metadata=_choice("jvp", "fd"))
    ridge: float = field(default=1e-14, metadata=_range(0.0))


@dataclass
class PrecondConfig:
    """Outer preconditioning: "analytic" (Analytic-Precond), "ctm" (s/t, 1 − s/t) or "cm"."""

    kind: str = field(default="analytic", metadata=_choice("analytic", "ctm", "cm"))
    form: str = field(default="backward", metadata=_choice("backward", "forward"))
    interpolation: str = field(default="cubic", metadata=_choice("cubic", "linear"))
    statistics_file: str = ""
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)


@dataclass
class DistanceConfig:
    """d(estimate, target) of the consistency term: squared L2 (mean over dimensions), pseudo-Huber
    √(‖Δ‖²/d + c²) − c, or LPIPS on 224-px bilinear upsamplings (images only)."""

    kind: str = field(default="l2", metadata=_choice("l2", "pseudo_huber", "lpips"))
    huber_c: float = field(default=0.03, metadata=_range(0.0, lo_open=True))
    lpips_net: str = field(default="alex", metadata=_choice("alex", "vgg"))
    # "avg": the VGG trunk's max-pools replaced by average pools, as CTM and CM compute LPIPS (piq's
    # replace_pooling=True); "max": the lpips package's network as released
    lpips_pooling: str = field(default="max", metadata=_choice("max", "avg"))
    lpips_trunk: str = ""


@dataclass
class CTMObjectiveConfig:
    """CTM's own keys (Kim et al. 2024). Defaults are sony/ctm's code defaults; the alternatives are
    apctl's earlier behaviour. See docs/math.md, "CTM as the reference code trains it"."""

    max_teacher_steps: int = field(default=17, metadata=_range(1, MAX_STEPS))
    # p(k) ∝ k, one k per step shared by all ranks (CTM) | k uniform per sample given a uniform start
    teacher_steps_law: str = field(default="weighted", metadata=_choice("weighted", "uniform"))
    # λ = ‖∇_W L_CTM‖/‖∇_W L_DSM‖ at the output layer, every step (CTM) | λ = dsm_weight
    dsm_weighting: str = field(default="adaptive", metadata=_choice("adaptive", "fixed"))
    dsm_weight: float = field(default=1.0, metadata=_range(0.0))
    # half lognormal(−1.2, 1.2), half on the noisiest `dsm_uniform_fraction` of the ρ-ramp (CTM) | all lognormal
    dsm_sigma_law: str = field(default="halflognormal", metadata=_choice("halflognormal", "lognormal"))
    dsm_uniform_fraction: float = field(default=0.7, metadata=_range(0.0, 1.0, lo_open=True))
    # the network of the target's inner jump: current θ without gradient (CTM's model_sg) | θ⁻
    target_inner: str = field(default="student", metadata=_choice("student", "target"))


@dataclass
class CDObjectiveConfig:
    """CD (Song et al. 2023) has no keys of its own: one teacher Heun step between neighbouring levels."""


@dataclass
class EDMObjectiveConfig:
    """EDM's denoiser loss (`apctl teacher train`): ln σ ~ N(p_mean, p_std²), weight (σ² + σ_d²)/(σ·σ_d)²."""

    p_mean: float = -1.2
    p_std: float = field(default=1.2, metadata=_range(0.0, lo_open=True))


@dataclass
class ECTObjectiveConfig:
    """ECT's own keys (Geng et al. 2025, "Consistency models made easy"). Defaults are locuslab/ect's
    CIFAR-10 recipe (`run_ecm.sh`, `ct_train.py`); ImageNet-64 uses P = (−0.8, 1.6), q = 4, c = 0.06 and
    the "edm" weighting. See docs/math.md, "ECT"."""

    p_mean: float = -1.1                                          # ln t ~ N(p_mean, p_std²)
    p_std: float = field(default=2.0, metadata=_range(0.0, lo_open=True))
    # Δt/t = n(t)/q^(stage+1):  n(t) = 1 + k·sigmoid(−b·t) ("sigmoid") | n ≡ 1 ("const")
    mapping: str = field(default="sigmoid", metadata=_choice("sigmoid", "const"))
    q: float = field(default=2.0, metadata=_range(1.0, lo_open=True))
    k: float = field(default=8.0, metadata=_range(0.0))
    b: float = field(default=1.0, metadata=_range(0.0))
    # iterations per stage (ECT counts 250 ticks of 100 iterations at batch 128: 25,000)
    stage_iterations: int = field(default=25_000, metadata=_range(1))
    huber_c: float = field(default=0.0, metadata=_range(0.0))     # d = √(‖Δ‖² + c²) − c, ‖·‖ over all pixels
    # w = 1/(t − r) (CIFAR-10) | 1/t² + 1/σ_d² (ImageNet-64, EDM's λ)
    weighting: str = field(default="gap", metadata=_choice("gap", "edm"))


@dataclass
class ISDObjectiveConfig:
    """iSD's own keys (Kim et al. 2026, improved self-distillation of flow maps). Defaults are
    SNU-VGILab/improvedSelfDistillation's (`methods/isd.py`, `configs/base4.yaml`, whose run takes
    guidance 5 on ImageNet). See docs/math.md, "iSD"."""

    time_beta_a: float = field(default=0.8, metadata=_range(0.0, lo_open=True))   # t, s ~ Beta(a, 1), sorted
    label_dropout: float = field(default=0.1, metadata=_range(0.0, 1.0))          # share of rows given no class
    guidance: float = field(default=1.0, metadata=_range(0.0))    # w: FM goal u + w·(v − u), u the no-class velocity
    # the tangent dF/dt along (v̂, ṫ): central difference (the released configs) | forward-mode JVP
    tangent: str = field(default="difference", metadata=_choice("difference", "jvp"))
    epsilon: float = field(default=0.005, metadata=_range(0.0, lo_open=True))     # the difference's half step
    # trig: ṫ = 1 per unit τ as the reference code ("reference") | ṫ = 1/1.57, the flow's own rate ("consistent")
    trig_tangent: str = field(default="reference", metadata=_choice("reference", "consistent"))
    adaptive_p: float = field(default=1.0, metadata=_range(0.0))  # loss = mean ℓ/sg(ℓ + c)^p
    adaptive_c: float = field(default=0.01, metadata=_range(0.0, lo_open=True))


@dataclass
class ObjectiveConfig:
    """The training objective: the keys every kind shares, then one section per kind.

    Only the section of `kind` may be given (`[objective.ctm]` with kind = "ctm"); a section of
    another kind is an error rather than silently ignored. A preset that `extends` another and
    changes `kind` drops the inherited section of the old kind.
    """

    KINDS: ClassVar[dict[str, type]] = {"ctm": CTMObjectiveConfig, "cd": CDObjectiveConfig, "ect": ECTObjectiveConfig,
                                        "isd": ISDObjectiveConfig, "edm": EDMObjectiveConfig}

    kind: str = field(default="ctm", metadata=_choice("ctm", "cd", "ect", "isd", "edm"))
    grid_points: int = field(default=18, metadata=_range(2, MAX_GRID_POINTS))
    target_ema: float = field(default=0.999, metadata=_range(0.0, 1.0))
    distance: DistanceConfig = field(default_factory=DistanceConfig)
    ctm: Optional[CTMObjectiveConfig] = None
    cd: Optional[CDObjectiveConfig] = None
    ect: Optional[ECTObjectiveConfig] = None
    isd: Optional[ISDObjectiveConfig] = None
    edm: Optional[EDMObjectiveConfig] = None

    def __post_init__(self) -> None:
        if self.kind in self.KINDS and getattr(self, self.kind) is None:
            setattr(self, self.kind, self.KINDS[self.kind]())

    @property
    def section(self) -> Any:
        """The section of the active kind (always present after loading)."""
        return getattr(self, self.kind)


@dataclass
class TrainingConfig:
    iterations: int = field(default=2000, metadata=_range(1, MAX_ITERATIONS))
    batch_size: int = field(default=256, metadata=_range(1, MAX_BATCH))
    lr: float = field(default=4e-4, metadata=_range(0.0, lo_open=True))
    optimizer: str = field(default="radam", metadata=_choice("radam", "adam"))
    betas: list = field(default_factory=lambda: [0.9, 0.999])   # (β₁, β₂) of either optimizer (training/optimizer.py)
    ema_decay: float = field(default=0.999, metadata=_range(0.0, 1.0))
    precision: str = field(default="fp32", metadata=_choice("fp32", "fp16", "bf16"))
    grad_clip: float = field(default=0.0, metadata=_range(0.0))
    log_every: int = field(default=50, metadata=_range(1))
    eval_every: int = field(default=0, metadata=_range(0))
    checkpoint_every: int = field(default=500, metadata=_range(1))
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    # EMA-only snapshots every this many iterations for curves over training (0 = off); never pruned
    snapshot_every: int = field(default=0, metadata=_range(0))
    # rows one device computes at once; the per-process share batch_size / world is accumulated over
    # share / batch_per_device micro-batches (EDM's --batch-gpu). 0: the whole share at once
    batch_per_device: int = field(default=0, metadata=_range(0))
    # learning rate of step k: lr · min(1, (k + 1)/lr_warmup) · decay, decay by lr_schedule from 1 at the
    # end of the warm-up (after a hold at full lr over the fraction lr_hold of the remaining steps) to
    # lr_floor (a fraction of lr) at step `iterations` (training/schedule.py)
    lr_warmup: int = field(default=0, metadata=_range(0))
    lr_hold: float = field(default=0.0, metadata=_range(0.0, 0.99))   # 0.5: full lr for half the run, then decay
    lr_schedule: str = field(default="constant", metadata=_choice("constant", "cosine", "linear"))
    lr_floor: float = field(default=0.0, metadata=_range(0.0, 1.0))
    # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
    max_skipped_steps: int = field(default=20, metadata=_range(1))
    tensorboard: bool = False      # also log to <run>/tensorboard (needs the tensorboard package)


@dataclass
class EvalConfig:
    """Evaluation defaults. `sigmas` is the default σ list of an NFE-n student sample: "karras" is CTM's
    `exact` sampler (n + 1 Karras levels, e.g. NFE 2: 80 → 2.515 → 0.002); "grid" snaps the inner
    levels to the training grid. `nfe` lists the NFEs `apctl eval` measures when not given --nfe.
    `fid_samples` is the image count of `apctl eval --fid` (EDM's protocol; 50,000 in the paper
    presets), `edm_steps` the levels of EDM's sampler for the teacher's row (2·edm_steps − 1 NFE: 18
    for CIFAR-10, 40 for FFHQ, 256 for ImageNet-64). `levels` names the σ list of an NFE outright, a
    table of NFE → n + 1 decreasing levels (`[eval.levels]` with `2 = [80.0, 0.0464, 0.002]`): the
    tuned intermediate time of multistep consistency sampling; inner levels snap to the grid when
    `sigmas` = "grid" (`apctl.sampling.SigmaPolicy`)."""

    sigmas: str = field(default="grid", metadata=_choice("grid", "karras"))
    levels: dict = field(default_factory=dict)
    n_samples: int = field(default=2048, metadata=_range(1, MAX_SAMPLES))
    teacher_steps: int = field(default=256, metadata=_range(2, MAX_STEPS))
    nfe: list = field(default_factory=lambda: [1, 2, 4])
    seed: int = field(default=12345, metadata=_range(0, MAX_SEED))
    fid_samples: int = field(default=512, metadata=_range(2))
    edm_steps: int = field(default=18, metadata=_range(2))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    precond: PrecondConfig = field(default_factory=PrecondConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain data (sections of inactive kinds left out), as saved in config.toml and checkpoints."""
        return _drop_none(dataclasses.asdict(self))


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# Loading and validation


class ConfigError(ApctlError):
    def __init__(self, source: str, key: str, reason: str):
        super().__init__(f"{source}: key '{key}': {reason}")


def _check_value(source: str, key: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """Type-check (and coerce int → float) one leaf value, then its range or choices."""
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        pass
    elif origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
    elif origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(source, key, f"expected a finite number, got {value!r}")
    elif origin is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
    elif origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a table [{key}], got {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(source, key, f"must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise ConfigError(source, key, f"must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(source, key, f"must be <= {hi}, got {value!r}")
    return value


def _apply(obj: Any, data: dict, source: str, prefix: str = "") -> None:
    """Write the (nested) mapping `data` onto the dataclass instance `obj`, validating every key.

    A dataclass with `KINDS` (e.g. ObjectiveConfig) takes only the section of its `kind`; that
    section is created with its defaults when the data does not give it.
    """
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    kinds = getattr(type(obj), "KINDS", None)
    if kinds and "kind" in data:
        setattr(obj, "kind", _check_value(source, f"{prefix}kind", fields["kind"], data["kind"], str))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(source, dotted, f"unknown key (known keys here: {known})")
        f, hint = fields[key], hints[key]
        if kinds and key in kinds:
            if key != obj.kind:
                raise ConfigError(source, dotted, f"this section is for {prefix}kind = {key!r}, "
                                                  f"but {prefix}kind = {obj.kind!r}")
            hint = kinds[key]
            if getattr(obj, key) is None:
                setattr(obj, key, hint())
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, f"expected a table [{dotted}], got {value!r}")
            _apply(getattr(obj, key), value, source, dotted + ".")
        else:
            setattr(obj, key, _check_value(source, dotted, f, value, hint))
    if kinds:
        for name in kinds:
            if name != obj.kind:
                setattr(obj, name, None)
        if getattr(obj, obj.kind) is None:
            setattr(obj, obj.kind, kinds[obj.kind]())


def config_from_dict(data: dict, source: str = "checkpoint", cross_field: bool = True) -> Config:
    """The Config of plain data; errors name `source`. `cross_field=False` leaves `validate` to the caller."""
    cfg = Config()
    _apply(cfg, data, source)
    if cross_field:
        validate(cfg, source)
    return cfg


MAX_RUN_NAME = 128


def _check_run_name(name: str, source: str) -> None:
    """run.name is the run directory's name inside runs/ (default --out): one plain folder name, so a
    run never writes outside runs/ (no '..', no separators, no absolute path, not empty)."""
    separators = {"/", "\0", os.sep, os.altsep or "/"}
    if not name.strip() or name in (".", "..") or any(c in name for c in separators) or len(name) > MAX_RUN_NAME:
        raise ConfigError(source, "run.name", f"must be a folder name of 1…{MAX_RUN_NAME} characters without "
                                              f"'/' and not '..' (the run directory inside runs/), got {name[:60]!r}")


def _check_levels(source: str, key: str, nfe: str, levels: Any) -> None:
    """One `[eval.levels]` entry: an NFE n from 1 to MAX_STEPS naming n + 1 positive, finite, strictly
    decreasing σ levels."""
    if not nfe.isdigit() or not 1 <= int(nfe) <= MAX_STEPS:
        raise ConfigError(source, key, f"the keys of [eval.levels] are NFEs, integers from 1 to {MAX_STEPS:,}")
    numbers = isinstance(levels, list) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in levels)
    if not numbers or len(levels) != int(nfe) + 1:
        raise ConfigError(source, key, f"NFE {nfe} takes a list of {int(nfe) + 1} σ levels (start … end), got {levels!r}")
    try:
        check_sigmas(levels)                       # the samplers' own rule for a σ list
    except ApctlError:
        raise ConfigError(source, key, f"σ levels must be positive, finite and strictly decreasing, got {levels!r}") from None


def validate(cfg: Config, source: str) -> None:
    """Cross-field rules that a single key's type and range cannot express."""
    _check_run_name(cfg.run.name, source)
    if not DEVICE_PATTERN.fullmatch(cfg.run.device):
        raise ConfigError(source, "run.device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.run.device!r}")
    t = cfg.teacher
    if t.kind == "gmm":
        if not t.means:
            raise ConfigError(source, "teacher.means", "a gmm teacher needs at least one mean")
        dims = {len(m) if isinstance(m, list) else -1 for m in t.means}
        if len(dims) != 1 or -1 in dims:
            raise ConfigError(source, "teacher.means", "must be a list of equally long lists of numbers")
        K = len(t.means)
        for key, value in (("weights", t.weights), ("classes", t.classes)):
            if value and len(value) != K:
                raise ConfigError(source, f"teacher.{key}", f"needs {K} entries (one per mean), got {len(value)}")
        if isinstance(t.stds, list) and len(t.stds) != K:
            raise ConfigError(source, "teacher.stds", f"needs {K} entries (one per mean) or one number")
        if cfg.data.kind != "teacher":
            raise ConfigError(source, "data.kind", "a gmm teacher draws its own data: use data.kind = 'teacher'")
    if t.kind == "empirical" and cfg.data.kind == "teacher":
        raise ConfigError(source, "data.kind", "an empirical teacher needs a data set (digits, cifar10, edm, folder)")
    o = cfg.objective
    if (o.kind == "edm") != (cfg.student.kind == "denoiser"):
        raise ConfigError(source, "student.kind", "objective.kind = 'edm' trains student.kind = 'denoiser', "
                                                  "and a denoiser trains only with the edm objective")
    if t.kind == "none" and (o.kind != "edm" or cfg.data.kind == "teacher"):
        raise ConfigError(source, "teacher.kind", "'none' is for teacher training (objective.kind = 'edm') on a data set")
    if t.kind == "network" and cfg.data.kind == "teacher":
        raise ConfigError(source, "data.kind", "a network teacher needs a data set (digits, cifar10, edm, folder)")
    if o.kind == "ect" and cfg.student.kind != "unet":
        raise ConfigError(source, "objective.kind", "ECT tunes a one-time image denoiser: it needs student.kind = 'unet' "
                                                    "(a two-time UNet whose s-embedding stays at zero)")
    if (o.kind == "isd") != (cfg.student.kind == "flow_map"):
        raise ConfigError(source, "student.kind", "objective.kind = 'isd' trains student.kind = 'flow_map' (a velocity "
                                                  "flow map), and a flow map trains only with the isd objective")
    if o.kind == "isd" and cfg.precond.kind != "ctm":
        raise ConfigError(source, "precond.kind", "iSD's flow map is the first-order jump (s/t, 1 − s/t) in σ: "
                                                  "it needs precond.kind = 'ctm'")
    if o.kind == "ctm" and o.ctm.max_teacher_steps > o.grid_points - 1:
        raise ConfigError(source, "objective.ctm.max_teacher_steps", f"at most objective.grid_points − 1 = {o.grid_points - 1}")
    if o.distance.kind == "lpips" and o.distance.lpips_pooling == "avg" and o.distance.lpips_net != "vgg":
        raise ConfigError(source, "objective.distance.lpips_pooling", "average pooling is CTM's VGG variant: it needs lpips_net = 'vgg'")
    if o.distance.kind == "lpips" and cfg.student.kind == "mlp":
        raise ConfigError(source, "objective.distance.kind", "lpips compares images: it needs student.kind = 'unet'")
    if len(cfg.training.betas) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                                           for b in cfg.training.betas):
        raise ConfigError(source, "training.betas", f"must be two numbers β₁, β₂ with 0 ≤ β < 1, got {cfg.training.betas!r}")
    for nfe, levels in cfg.eval.levels.items():
        _check_levels(source, f"eval.levels.{nfe}", nfe, levels)
    if not cfg.eval.nfe or any(not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_STEPS
                               for n in cfg.eval.nfe):
        raise ConfigError(source, "eval.nfe", f"must be a list of integers from 1 to {MAX_STEPS:,}")
