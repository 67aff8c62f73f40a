"""A distillation run: build every part from its config section, train, checkpoint, resume by re-running.

Read top to bottom: `prepare` builds the teacher, data, statistics, preconditioning, objective,
student, target network θ⁻, evaluation EMA and optimizer, and restores the latest checkpoint of
the run directory if there is one; `alignment_probe` measures the EMA student against the teacher's
ODE during training; `train` is the loop; `finish` writes the final samples and a summary. Every
random draw of step k comes from a generator seeded by (run seed, rank, k), so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from apctl.checkpoints import list_checkpoints, load_checkpoint, restore_optimizer, save_checkpoint
from apctl.config import Config
from apctl.presets import config_to_toml
from apctl.errors import ApctlError
from apctl.files import atomic_write
from apctl.strict_json import dumps, encode_nonfinite
from apctl.training import distributed
from apctl.training.ema import frozen_copy
from apctl.training.step import step_generator, train_step  # noqa: F401 (step_generator re-exported)

# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("run.threads", "training.iterations", "training.log_every", "training.checkpoint_every",
                     "training.keep_checkpoints", "training.eval_every", "eval.")


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def statistics_progress(self, done: int, total: int) -> None: ...
    def start(self, start_step: int, total_steps: int) -> None: ...
    def step(self, step: int, logs: dict[str, float]) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def message(self, text): pass
    def statistics_progress(self, done, total): pass
    def start(self, start_step, total_steps): pass
    def step(self, step, logs): pass
    def finish(self): pass


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    teacher: Any
    data_source: Any
    precond: Any
    objective: Any
    student: torch.nn.Module
    target: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    arch: dict
    device: torch.device
    scaler: torch.amp.GradScaler
    step: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def resolve_device(name: str, what: str = "run.device") -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N' as a torch.device; `what` names
    the setting in errors (e.g. '--device')."""
    from apctl.config import DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(name):
        raise ApctlError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ApctlError(f"{what} = {name!r} but no CUDA device is available (use 'auto' or 'cpu')")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ApctlError(f"{what} = {name!r} but only {torch.cuda.device_count()} CUDA device(s) are available")
    return torch.device(name)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring the keys a resumed run may change."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or resident (max RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux reports KiB


def check_teacher_fits_data(teacher, data_source) -> None:
    """The teacher's sample shape and classes must be the data's (checked before anything is written)."""
    if teacher is None:
        return
    if tuple(teacher.shape) != tuple(data_source.shape):
        raise ApctlError(f"the teacher takes samples of shape {tuple(teacher.shape)} but the data set's are "
                         f"{tuple(data_source.shape)} (channels, height, width): pass matching --teacher and --data")
    if teacher.label_dim != data_source.label_dim:
        has = lambda n: f"{n} classes" if n else "no labels"  # noqa: E731
        raise ApctlError(f"the teacher is conditioned on {has(teacher.label_dim)} but the data brings "
                         f"{has(data_source.label_dim)}: check data.class_conditional and the teacher file")


def prepare(cfg: Config, run_dir: Path, reporter: Reporter | None = None) -> Run:
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.networks.registry import count_parameters
    from apctl.networks.student import build_student, parameter_count, set_dropout, student_architecture
    from apctl.objectives import build_objective, distills
    from apctl.preconditioning.build import build_preconditioning, needs_statistics, obtain_statistics
    from apctl.teachers import build_teacher
    from apctl.threads import apply_thread_policy

    reporter = reporter or SilentReporter()
    run_dir = Path(run_dir)
    world = distributed.world_size()
    if cfg.training.batch_size % world:
        raise ApctlError(f"training.batch_size = {cfg.training.batch_size} is not divisible by the {world} processes")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    latest = load_checkpoint(checkpoints[-1]) if checkpoints else None
    if latest is not None:
        changed = config_differences(latest.meta["config"], cfg.to_dict())
        if changed:
            raise ApctlError(f"{run_dir} holds a run with a different config ({', '.join(changed[:4])}); "
                             "pass a new --out, or the same settings to resume it")
    device = resolve_device(cfg.run.device)
    # Files are read before anything is written: a missing teacher or data set leaves no run directory.
    data = load_training_data(cfg.data)
    teacher = build_teacher(cfg.teacher, data)
    data_source = build_data_source(cfg.data, teacher, data)
    check_teacher_fits_data(teacher, data_source)
    teacher_network = teacher.network if teacher is not None else None
    arch = student_architecture(cfg.student, data_source.shape, data_source.label_dim, teacher_network)
    # Before any statistics or step: the thread count for the larger of the two networks.
    teacher_parameters = count_parameters(teacher_network) if teacher_network is not None else 0
    # A student started from the teacher is the teacher plus a small s-embedding: its size is the teacher's.
    from_teacher = arch["kind"] == "unet" and teacher_network is not None and cfg.student.init_from_teacher
    student_parameters = teacher_parameters if from_teacher else parameter_count(arch)
    threads = apply_thread_policy(cfg.run.threads, device, max(student_parameters, teacher_parameters))
    reporter.message(f"torch: {threads}")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.toml", config_to_toml(cfg))
        if latest is None:
            # A fresh run: logs of an earlier attempt that never reached a checkpoint are stale.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    distilling = distills(cfg.objective)
    # The teacher moves to the device before anything evaluates it (statistics, probe, training).
    if teacher is not None:
        teacher.to(device)
    # Only rank 0 estimates statistics; the others then read its cache.
    stats = None
    if distilling and needs_statistics(cfg.precond):
        if not distributed.is_main():
            distributed.barrier()
        stats, origin = obtain_statistics(cfg.precond, teacher, data_source, run_dir / "precond_stats.safetensors",
                                          reporter.statistics_progress)
        reporter.message(f"Analytic-Precond statistics: {origin} ({len(stats.lam)} levels)")
        if distributed.is_main():
            distributed.barrier()
    precond = build_preconditioning(cfg.precond, stats) if distilling else None

    torch.manual_seed(cfg.run.seed)
    student = build_student(arch, teacher_network if cfg.student.init_from_teacher else None).to(device)
    set_dropout(student, cfg.student.dropout)
    # θ and θ⁻ run in train mode (the architecture's dropout applies in every pass, as in CTM's code);
    # the evaluation EMA samples in eval mode; the teacher is always in eval mode.
    student.train()
    target = frozen_copy(student).train() if distilling else None
    ema = frozen_copy(student).eval()
    opt_cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[cfg.training.optimizer]
    optimizer = opt_cls(student.parameters(), lr=cfg.training.lr)
    objective = build_objective(cfg.objective, teacher, precond).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.training.precision == "fp16")
    run = Run(cfg, run_dir, teacher, data_source, precond, objective, student, target, ema, optimizer,
              arch, device, scaler)
    if latest is not None:
        run.student.load_state_dict(latest.group("student"))
        if run.target is not None:
            run.target.load_state_dict(latest.group("target"))
        run.ema.load_state_dict(latest.group("ema"))
        restore_optimizer(run.optimizer, latest)
        if latest.meta.get("scaler"):
            run.scaler.load_state_dict(latest.meta["scaler"])
        run.step = latest.step
        _truncate_metrics(run_dir / "metrics.jsonl", run.step)
        reporter.message(f"resuming {run_dir} from step {run.step}")
    return run


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (they will be logged again)."""
    if distributed.is_main() and path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write(path, "".join(ln + "\n" for ln in lines))


def save(run: Run, logs: dict | None = None) -> Path | None:
    if not distributed.is_main():
        return None
    meta = {"config": run.cfg.to_dict(), "student": encode_nonfinite(run.arch, "string"),
            "teacher_fingerprint": run.teacher.fingerprint() if run.teacher is not None else "",
            "scaler": run.scaler.state_dict(), "logs": logs or {}}
    precond_state = {f"precond.{k}": v for k, v in run.precond.state_dict().items()} if run.precond else {}
    networks = {"student": run.student, "target": run.target, "ema": run.ema}
    return save_checkpoint(run.checkpoint_dir, run.step, meta, {k: v for k, v in networks.items() if v is not None},
                           run.optimizer, extra_tensors=precond_state, keep=run.cfg.training.keep_checkpoints)


def _log(run: Run, path: Path, logs: dict) -> None:
    run.history.append(logs)
    if distributed.is_main():
        with open(path, "a") as fh:
            fh.write(dumps(logs) + "\n")


def train(run: Run, reporter: Reporter | None = None, probe=None) -> Run:
    """Run the loop from `run.step` to `training.iterations`, checkpointing along the way.

    `probe(run) -> dict` (e.g. the EMA student's alignment with the teacher) is evaluated every
    `training.eval_every` steps and logged; it draws no training randomness.
    """
    reporter = reporter or SilentReporter()
    tc = run.cfg.training
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = tc.batch_size // world
    model = run.student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(run.student)
    metrics_path = run.run_dir / "metrics.jsonl"
    if probe is not None and tc.eval_every and run.step == 0:
        _log(run, metrics_path, dict(probe(run), step=0))
    reporter.start(run.step, tc.iterations)
    clock, last_logged = time.perf_counter(), run.step
    sums: dict[str, torch.Tensor] = {}
    logs: dict[str, float] = {}
    while run.step < tc.iterations:
        step_logs = train_step(run, run.step, model, rank, per_rank)
        for key, value in step_logs.items():       # summed on the device; read once per log line
            sums[key] = sums.get(key, 0) + value.detach().float()
        run.step += 1

        # The final step is always measured, so the last line and samples.png describe the same model.
        evaluate = probe is not None and (run.step % tc.eval_every == 0 or run.step == tc.iterations)
        if run.step % tc.log_every == 0 or run.step == tc.iterations or evaluate:
            now = time.perf_counter()
            steps = run.step - last_logged
            logs = {key: value / steps for key, value in distributed.mean_over_ranks(sums).items()}
            logs = dict(logs, step=run.step, it_per_s=steps / max(now - clock, 1e-9), time=time.time(),
                        lr=run.optimizer.param_groups[0]["lr"], peak_memory_mb=peak_memory_mb(run.device))
            if run.scaler.is_enabled():
                logs["loss_scale"] = run.scaler.get_scale()
            clock, last_logged, sums = now, run.step, {}
            if evaluate:
                logs.update(probe(run))
            _log(run, metrics_path, logs)
        reporter.step(run.step, logs)
        if run.step % tc.checkpoint_every == 0 and run.step < tc.iterations:
            save(run, logs)
    save(run, logs)
    reporter.finish()
    return run


def alignment_probe(run: Run, progress=None):
    """probe(run) → {"align_nfe1", "align_nfe2"}: the EMA student's alignment RMS with the teacher's
    ODE on fixed noise (`[eval]` seed, at most 1,024 samples); None when `training.eval_every` = 0."""
    from apctl.metrics.evaluation import training_probe

    from apctl.objectives import distills

    if not run.cfg.training.eval_every or not distills(run.cfg.objective):
        return None
    e = run.cfg.eval
    return training_probe(run.teacher, run.teacher.shape, run.data_source.label_dim, min(e.n_samples, 1024),
                          e.seed, e.teacher_steps, run.objective.grid.numpy(), progress=progress, schedule=e.sigmas)


@torch.no_grad()
def final_samples(run: Run, n: int = 1024, nfe: int = 2) -> tuple[np.ndarray, np.ndarray | None]:
    """`nfe`-step samples of the evaluation EMA and, for exact teachers, exact teacher samples."""
    from apctl.sampling import class_labels, default_sigmas, student_sample

    gen = torch.Generator().manual_seed(run.cfg.eval.seed)
    z = torch.randn((n, *run.teacher.shape), generator=gen)
    labels = class_labels(n, run.data_source.label_dim)
    samples = student_sample(run.ema, run.precond, z.to(run.device), default_sigmas(nfe, run.objective.grid.numpy(), run.cfg.eval.sigmas),
                             None if labels is None else labels.to(run.device))
    reference = run.teacher.sample(n, gen).float().cpu().numpy() if run.teacher.exact else None
    return samples.cpu().numpy(), reference


def export_teacher(run: Run) -> Path:
    """The evaluation-EMA denoiser of a teacher-training run as an apctl teacher file
    (`<run>/teacher.safetensors` + JSON with its fingerprint and the config and step that made it),
    which `--teacher` and `apctl teacher import` accept."""
    import copy

    from apctl.teachers.apctl_format import save_teacher
    from apctl.teachers.bundle import TeacherBundle, compute_fingerprint

    network = copy.deepcopy(run.ema).to("cpu").eval()
    arch = {"class_name": "EDMPrecond", "init_kwargs": dict(run.arch["init_kwargs"])}
    bundle = TeacherBundle(network=network, arch=arch, source_format="apctl",
                           fingerprint=compute_fingerprint(network.state_dict(), arch),
                           source={"format": "apctl teacher train", "file": str(run.run_dir)},
                           extras={"trained_by": {"config": run.cfg.to_dict(), "step": run.step}})
    weights, _ = save_teacher(bundle, run.run_dir / "teacher.safetensors")
    return weights


@torch.no_grad()
def teacher_samples(run: Run, n: int = 100, steps: int = 18) -> np.ndarray:
    """EDM's deterministic sampler on the evaluation-EMA denoiser: `steps` Karras levels then σ = 0,
    2·steps − 1 evaluations (35 for 18); classes cycle when conditional."""
    from apctl.sampling import class_labels, heun_solve
    from apctl.schedules import karras_sigmas

    gen = torch.Generator().manual_seed(run.cfg.eval.seed)
    z = torch.randn((n, *run.data_source.shape), generator=gen).to(run.device)
    labels = class_labels(n, run.data_source.label_dim)
    labels = None if labels is None else labels.to(run.device)
    sigmas = karras_sigmas(steps).tolist() + [0.0]
    return heun_solve(run.ema, z * sigmas[0], sigmas, labels).cpu().numpy()


def finish(run: Run) -> list[str]:
    """Write samples.png (and, for teacher training, the teacher file) and return summary lines."""
    from apctl.plots import plot_samples

    from apctl.objectives import distills

    if not distills(run.cfg.objective):    # teacher training: export the EMA denoiser, show its EDM samples
        weights = export_teacher(run)
        path = run.run_dir / "samples.png"
        plot_samples(teacher_samples(run), path, title=f"{run.cfg.run.name}: EDM sampler, 35 NFE, step {run.step}")
        return [f"run directory: {run.run_dir}", f"teacher: {weights} (use it with --teacher)",
                f"35-NFE samples: {path}"]
    image = len(run.data_source.shape) == 3
    samples, reference = final_samples(run, n=64 if image else 1024)
    path = run.run_dir / "samples.png"
    plot_samples(samples, path, None if image else reference, title=f"{run.cfg.run.name}: 2-step samples, step {run.step}")
    lines = [f"run directory: {run.run_dir}", f"2-step samples: {path}"]
    last = next((h for h in reversed(run.history) if "align_nfe2" in h), None)
    if last:
        lines.append(f"alignment RMS vs teacher ODE at step {last['step']}: "
                     f"1 step {last['align_nfe1']:.4f}, 2 steps {last['align_nfe2']:.4f}")
    return lines
