"""A distillation run: build every part from its config section, train, checkpoint, resume by re-running.

Read top to bottom: `prepare` builds the teacher, data, statistics, preconditioning, objective,
student, target network θ⁻, evaluation EMA and optimizer, and restores the latest checkpoint of
the run directory if there is one; `alignment_probe` measures the EMA student against the teacher's
ODE during training; `train` is the loop; `finish` writes the final samples and a summary. Every
random draw of step k is a function of (run seed, k, the sample's index in the global batch) — dropout
of (seed, rank, k) — and the learning rate a function of k, so a resumed run repeats an uninterrupted
one exactly (training/step.py). A step with a non-finite loss or gradient is skipped, too many in a
row stop the run, and no non-finite checkpoint is written (training/guard.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from apctl.checkpoints import list_checkpoints, load_latest_checkpoint, restore_optimizer, save_checkpoint
from apctl.config import Config
from apctl.presets import config_to_toml
from apctl.errors import ApctlError, RunStopped
from apctl.files import WRITE_ERRNOS, atomic_write, remove_stale_temporaries, write_error
from apctl.plots import write_metrics_figure
from apctl.strict_json import dumps
from apctl.training import distributed, guard
from apctl.training.ema import frozen_copy
from apctl.training.lock import RunLock, check_unlocked
from apctl.training.optimizer import build_optimizer
from apctl.training.run_directory import NewEntries, check_run_directory
from apctl.training.schedule import learning_rate
from apctl.training.signals import StopAtOnce, StopSignals, exit_code, signal_name
from apctl.training.snapshots import save_snapshot
from apctl.training.step import micro_batches, step_generator, train_step  # noqa: F401 (step_generator re-exported)
from apctl.training.tensorboard_sink import open_tensorboard, tensorboard_sink_available

# Keys that may change between a run and its resumption (they do not change what is learned;
# batch_per_device changes float rounding only, see training/step.py).
RESUMABLE_CHANGES = ("run.threads", "training.iterations", "training.log_every", "training.checkpoint_every",
                     "training.keep_checkpoints", "training.eval_every", "training.snapshot_every",
                     "training.batch_per_device", "training.max_skipped_steps", "training.tensorboard", "eval.")


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def statistics_progress(self, done: int, total: int) -> None: ...
    def start(self, start_step: int, total_steps: int, terms: tuple[str, ...]) -> None: ...
    def step(self, step: int, logs: dict[str, float]) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def message(self, text): pass
    def statistics_progress(self, done, total): pass
    def start(self, start_step, total_steps, terms): pass
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
    lock: RunLock | None = None              # rank 0's hold on the run directory
    new_entries: NewEntries | None = None    # a fresh run's additions, discarded if it fails before a checkpoint

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def grid(self) -> np.ndarray:
        """The run's Karras grid (`objective.grid_points` levels, float64, host): CTM's and CD's pairs are
        drawn on it, and every objective's sampler σ lists snap to it (`eval.sigmas = "grid"`)."""
        from apctl.schedules import karras_sigmas

        return karras_sigmas(self.cfg.objective.grid_points)

    def close(self) -> None:
        """Release the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self) -> None:
        """After a failure: a fresh run with no checkpoint yet leaves nothing behind; then release."""
        if self.new_entries is not None and not list_checkpoints(self.checkpoint_dir):
            self.new_entries.discard()
        self.close()


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
    """Dotted keys whose values differ, ignoring the keys a resumed run may change — but for
    training.iterations under a decaying learning-rate schedule, whose length it sets. A key the old
    config lacks (added to apctl after the run was saved) is unchanged when the new one holds its default."""
    a, b, defaults = _flat(old), _flat(new), _flat(Config().to_dict())
    keys = sorted(set(a) | set(b))
    fixed = {"training.iterations"} if b.get("training.lr_schedule", "constant") != "constant" else set()

    def differs(k: str) -> bool:
        if k not in a and k in b and k in defaults:
            return b[k] != defaults[k]
        return a.get(k) != b.get(k)

    return [k for k in keys if differs(k) and (k in fixed or not k.startswith(RESUMABLE_CHANGES))]


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
    """Check everything that can be checked (run directory, lock, checkpoints, teacher, data, given
    statistics) before writing anything, then take the run directory's lock and build the run."""
    reporter = reporter or SilentReporter()
    run_dir = Path(run_dir)
    micro_batches(cfg.training.batch_size, distributed.world_size(), distributed.rank(), cfg.training.batch_per_device)
    if cfg.training.tensorboard:
        tensorboard_sink_available()
    check_run_directory(run_dir)
    check_unlocked(run_dir)
    latest = load_latest_checkpoint(run_dir / "checkpoints", reporter.message)
    if latest is not None:
        changed = config_differences(latest.meta["config"], cfg.to_dict())
        if changed:
            why = (f" (a {cfg.training.lr_schedule} lr_schedule ends at training.iterations, so a run with one "
                   "cannot be extended; train it with lr_schedule = \"constant\" to extend it later)"
                   if "training.iterations" in changed else "")
            raise ApctlError(f"{run_dir} holds a run with a different config ({', '.join(changed[:4])}){why}; "
                             "pass a new --out, or the same settings to resume it")
    device = resolve_device(cfg.run.device)
    # Files are read before anything is written: a missing teacher or data set leaves no run directory.
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.networks.registry import count_parameters
    from apctl.networks.student import parameter_count, student_architecture
    from apctl.objectives import distills
    from apctl.preconditioning.build import needs_statistics, obtain_statistics
    from apctl.teachers import build_teacher
    from apctl.threads import apply_thread_policy

    data = load_training_data(cfg.data)
    teacher = build_teacher(cfg.teacher, data)
    data_source = build_data_source(cfg.data, teacher, data)
    check_teacher_fits_data(teacher, data_source)
    if latest is not None and latest.meta.get("teacher_fingerprint", "") != (teacher.fingerprint() if teacher else ""):
        raise ApctlError(f"{run_dir} was trained with another teacher ({latest.meta.get('teacher_fingerprint')}); "
                         "pass the same --teacher to resume it, or a new --out")
    teacher_network = teacher.network if teacher is not None else None
    arch = student_architecture(cfg.student, data_source.shape, data_source.label_dim, teacher_network)
    if latest is not None and latest.meta["student"] != arch:
        raise ApctlError(f"{latest.path} describes another student architecture than this config builds; "
                         "pass the same settings and teacher to resume it, or a new --out")
    # Before any statistics or step: the thread count for the larger of the two networks.
    teacher_parameters = count_parameters(teacher_network) if teacher_network is not None else 0
    # A student started from the teacher is the teacher plus a small s-embedding: its size is the teacher's.
    from_teacher = arch["kind"] == "unet" and teacher_network is not None and cfg.student.init_from_teacher
    student_parameters = teacher_parameters if from_teacher else parameter_count(arch)
    threads = apply_thread_policy(cfg.run.threads, device, max(student_parameters, teacher_parameters))
    reporter.message(f"torch: {threads}")
    stats = None
    if distills(cfg.objective) and needs_statistics(cfg.precond) and cfg.precond.statistics_file:
        stats, _ = obtain_statistics(cfg.precond, teacher, data_source, None)     # a given file: checked now

    lock = new_entries = None
    if distributed.is_main():
        new_entries = None if latest is not None else NewEntries(run_dir)
        lock = RunLock.acquire(run_dir, reporter.message)
        for folder in (run_dir, run_dir / "checkpoints"):
            remove_stale_temporaries(folder)     # left by a process killed mid-write; ours alone hold the lock
        if latest is None:
            # A fresh run: logs of an earlier attempt that never reached a checkpoint are stale.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    try:
        run = _build(cfg, run_dir, reporter, device, teacher, data_source, stats, latest, arch)
    except BaseException:
        if new_entries is not None:
            new_entries.discard()
        if lock is not None:
            lock.release()
        raise
    run.lock, run.new_entries = lock, new_entries
    return run


def _build(cfg: Config, run_dir: Path, reporter: Reporter, device, teacher, data_source, stats, latest, arch) -> Run:
    """prepare's second half, once the run directory is ours: statistics, networks, optimizer, restore."""
    from apctl.networks.student import build_student, set_dropout
    from apctl.objectives import build_objective, distills, one_time, uses_target
    from apctl.preconditioning.build import build_preconditioning, needs_statistics, obtain_statistics

    distilling = distills(cfg.objective)
    # The teacher moves to the device before anything evaluates it (statistics, probe, training).
    if teacher is not None:
        teacher.to(device)
    # Only rank 0 estimates statistics; the others then read its cache.
    if stats is None and distilling and needs_statistics(cfg.precond):
        if not distributed.is_main():
            distributed.barrier()
        with StopAtOnce("the Analytic-Precond statistics"):
            stats, origin = obtain_statistics(cfg.precond, teacher, data_source, run_dir / "precond_stats.safetensors",
                                              reporter.statistics_progress)
        reporter.message(f"Analytic-Precond statistics: {origin} ({len(stats.lam)} levels)")
        if distributed.is_main():
            distributed.barrier()
    precond = build_preconditioning(cfg.precond, stats) if distilling else None

    torch.manual_seed(cfg.run.seed)
    teacher_network = teacher.network if teacher is not None else None
    student = build_student(arch, teacher_network if cfg.student.init_from_teacher else None).to(device)
    set_dropout(student, cfg.student.dropout)
    if one_time(cfg.objective):
        student.freeze_s_embedding()    # ECT: D_θ(x, t, s) stays one-time, the same for every s
    # θ and θ⁻ run in train mode (the architecture's dropout applies in every pass, as in CTM's code);
    # the evaluation EMA samples in eval mode; the teacher is always in eval mode.
    student.train()
    target = frozen_copy(student).train() if uses_target(cfg.objective) else None
    ema = frozen_copy(student).eval()
    optimizer = build_optimizer(cfg.training, student.parameters(), learning_rate(cfg.training, 0))
    objective = build_objective(cfg.objective, teacher, precond).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.training.precision == "fp16")
    run = Run(cfg, run_dir, teacher, data_source, precond, objective, student, target, ema, optimizer,
              arch, device, scaler)
    if latest is not None:
        run.student.load_state_dict(latest.group("student"))
        if run.target is not None:
            run.target.load_state_dict(latest.group("target"))
        run.ema.load_state_dict(latest.group("ema"))
        try:
            restore_optimizer(run.optimizer, latest)
        except (ValueError, KeyError, TypeError) as exc:
            raise ApctlError(f"{latest.path}: its optimizer state does not fit this run ({exc})") from None
        if latest.meta.get("scaler"):
            run.scaler.load_state_dict(latest.meta["scaler"])
        run.step = latest.step
        _truncate_metrics(run_dir / "metrics.jsonl", run.step)
        reporter.message(f"resuming {run_dir} from step {run.step}")
    if distributed.is_main():
        # Written last: a run refused above (or a failed resume) leaves the old config.toml as it was.
        atomic_write(run_dir / "config.toml", config_to_toml(cfg))
    return run


def _metrics_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line that is not a JSON object with an integer step
    (the last line of a process killed mid-append, or damaged)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (they will be logged again), and any line
    that does not parse (a line cut short when the process died)."""
    if distributed.is_main() and path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [ln for ln in text.splitlines() if (s := _metrics_step(ln)) is not None and s <= step]
        atomic_write(path, "".join(ln + "\n" for ln in lines))


def save(run: Run, logs: dict | None = None) -> Path | None:
    """Checkpoint the run at `run.step` from rank 0, after every rank has checked that the state is
    finite (the ranks hold the same state, so they refuse together)."""
    precond_state = {f"precond.{k}": v for k, v in run.precond.state_dict().items()} if run.precond else {}
    networks = {"student": run.student, "target": run.target, "ema": run.ema}
    state = {f"{name}.{k}": v for name, net in networks.items() if net is not None for k, v in net.state_dict().items()}
    state.update({f"optim.{i}.{k}": v for i, s in run.optimizer.state_dict()["state"].items() for k, v in s.items()})
    guard.check_finite(dict(state, **precond_state), run.step)
    if not distributed.is_main():
        return None
    meta = {"config": run.cfg.to_dict(), "student": run.arch,
            "teacher_fingerprint": run.teacher.fingerprint() if run.teacher is not None else "",
            "scaler": run.scaler.state_dict(), "logs": guard.json_safe(logs or {})}
    path = save_checkpoint(run.checkpoint_dir, run.step, meta, {k: v for k, v in networks.items() if v is not None},
                           run.optimizer, extra_tensors=precond_state, keep=run.cfg.training.keep_checkpoints)
    write_metrics_figure(run.run_dir / "metrics.jsonl", title=f"{run.cfg.run.name}, step {run.step}")
    return path


def _log(run: Run, path: Path, logs: dict, sink=None) -> None:
    """Append one metrics line (strict JSON: non-finite values as null, see training/guard.py) and
    hand the logs to the TensorBoard sink if there is one."""
    run.history.append(logs)
    if distributed.is_main():
        try:
            with open(path, "a") as fh:        # an append: a cut-short last line is dropped on resume
                fh.write(dumps(guard.json_safe(logs)) + "\n")   # strict JSON, one encoder for every file
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(path, exc) from None
            raise
        if sink is not None:
            sink.write(logs)


def train(run: Run, reporter: Reporter | None = None, probe=None) -> Run:
    """Run the loop from `run.step` to `training.iterations`, checkpointing along the way.

    `probe(run) -> dict` (e.g. the EMA student's alignment with the teacher) is evaluated every
    `training.eval_every` steps and logged; it draws no training randomness. SIGTERM / SIGINT stop
    the loop after the step in progress with a checkpoint and `RunStopped` (`training/signals.py`).
    Whatever ends the loop, the progress display is closed; a failure before a fresh run's first
    checkpoint leaves nothing behind (`Run.abandon`).
    """
    reporter = reporter or SilentReporter()
    try:
        with StopSignals(run.device, sync_every=run.cfg.training.log_every) as stop:
            return _train(run, reporter, probe, stop)
    except BaseException:
        run.abandon()
        raise
    finally:
        reporter.finish()      # the progress bar stops and the cursor comes back, however the loop ended


def _train(run: Run, reporter: Reporter, probe, stop: StopSignals) -> Run:
    tc = run.cfg.training
    world, rank = distributed.world_size(), distributed.rank()
    distributed.check_same_weights({"student": run.student, "target": run.target, "ema": run.ema}, run.step)
    model = run.student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(run.student)
    metrics_path = run.run_dir / "metrics.jsonl"
    sink = open_tensorboard(run.run_dir) if tc.tensorboard and distributed.is_main() else None
    if probe is not None and tc.eval_every and run.step == 0:
        _log(run, metrics_path, dict(probe(run), step=0), sink)
    # The logged terms the progress line shows: the total loss, unless the objective names others.
    reporter.start(run.step, tc.iterations, getattr(run.objective, "progress_terms", ("loss",)))
    clock, last_logged = time.perf_counter(), run.step
    skips = guard.ConsecutiveSkips(tc.max_skipped_steps)
    sums: dict[str, torch.Tensor] = {}
    logs: dict[str, float] = {}
    while run.step < tc.iterations:
        step_logs = train_step(run, run.step, model, rank, world)
        for key, value in step_logs.items():       # summed on the device; read once per log line
            sums[key] = sums.get(key, 0) + value.detach().float()
        run.step += 1
        skips.record(run.step, bool(step_logs["skipped"]))     # known on the host already (training/guard.py)

        # The final step is always measured, so the last line and samples.png describe the same model.
        evaluate = probe is not None and (run.step % tc.eval_every == 0 or run.step == tc.iterations)
        if run.step % tc.log_every == 0 or run.step == tc.iterations or evaluate or skips.exhausted:
            now = time.perf_counter()
            steps = run.step - last_logged
            # Every rank computes the same number of rows, so the mean over ranks of each rank's
            # interval mean is the interval mean over the global batch (grad_norm: equal on every rank).
            logs = {key: value / steps for key, value in distributed.mean_over_ranks(sums).items()}
            images_per_s = steps * tc.batch_size / max(now - clock, 1e-9)
            logs = dict(logs, step=run.step, it_per_s=steps / max(now - clock, 1e-9), images_per_s=images_per_s,
                        s_per_kimg=1000 / images_per_s, time=time.time(), lr=run.optimizer.param_groups[0]["lr"],
                        peak_memory_mb=distributed.max_over_ranks(peak_memory_mb(run.device)))
            if run.scaler.is_enabled():
                logs["loss_scale"] = run.scaler.get_scale()
            clock, last_logged, sums = now, run.step, {}
            if evaluate and not skips.exhausted:
                logs.update(probe(run))
            _log(run, metrics_path, logs, sink)
        reporter.step(run.step, logs)
        if skips.exhausted:                         # diverged: stop without another checkpoint
            if sink is not None:
                sink.close()
            raise skips.error()
        if run.step % tc.checkpoint_every == 0 and run.step < tc.iterations:
            save(run, logs)
        snapshot = save_snapshot(run)               # EMA-only, every training.snapshot_every steps
        if snapshot is not None:                    # with its picture, so a report can show the progression
            write_samples_picture(run, snapshot.with_name(f"samples-{run.step:07d}.png"))
        if signum := stop.requested(run.step):      # SIGTERM / SIGINT: stop after the step that was running
            _stop(run, logs, signum)
    save(run, logs)
    if sink is not None:
        sink.close()
    return run


def _stop(run: Run, logs: dict, signum: int) -> None:
    """Checkpoint the current step (unless just saved) and raise RunStopped with where and how to resume."""
    tc = run.cfg.training
    if run.step % tc.checkpoint_every or run.step == tc.iterations:
        save(run, logs)
    where = run.checkpoint_dir / f"ckpt-{run.step:07d}.json"
    raise RunStopped(f"{signal_name(signum)}: stopped at step {run.step} of {tc.iterations}, checkpoint {where}; "
                     "re-run the same command to resume", exit_code(signum))


def alignment_probe(run: Run, progress=None):
    """probe(run) → {"align_nfe1", "align_nfe2"}: the EMA student's alignment RMS with the teacher's
    ODE on fixed noise (`[eval]` seed, at most 1,024 samples), and for a Gaussian-mixture teacher the
    fractions beyond 3σ of a mode (`training_probe`); None when `training.eval_every` = 0."""
    from apctl.metrics.evaluation import training_probe
    from apctl.sampling import SigmaPolicy

    from apctl.objectives import distills

    if not run.cfg.training.eval_every or not distills(run.cfg.objective):
        return None
    e = run.cfg.eval
    try:
        with StopAtOnce("the teacher ODE reference of the alignment probe"):
            return training_probe(run.teacher, run.teacher.shape, run.data_source.label_dim, min(e.n_samples, 1024),
                                  e.seed, e.teacher_steps, run.grid, progress=progress,
                                  policy=SigmaPolicy.of(e))
    except BaseException:
        run.abandon()          # a fresh run stopped here leaves nothing behind, as one that failed in prepare
        raise


@torch.no_grad()
def final_samples(run: Run, n: int = 1024, nfe: int = 2) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    """`nfe`-step samples of the evaluation EMA, for exact teachers exact teacher samples (else None), and the σ
    list the student sampled (the run's, `SigmaPolicy.of`)."""
    from apctl.sampling import SigmaPolicy, class_labels, student_sample

    gen = torch.Generator().manual_seed(run.cfg.eval.seed)
    z = torch.randn((n, *run.teacher.shape), generator=gen)
    labels = class_labels(n, run.data_source.label_dim)
    sigmas = SigmaPolicy.of(run.cfg.eval).sigmas(nfe, run.grid)
    samples = student_sample(run.ema, run.precond, z.to(run.device), sigmas, None if labels is None else labels.to(run.device))
    reference = run.teacher.sample(n, gen).float().cpu().numpy() if run.teacher.exact else None
    return samples.cpu().numpy(), reference, sigmas


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


def _cycling_classes(n: int, label_dim: int) -> np.ndarray | None:
    """The class index of each of `final_samples`/`teacher_samples`' n samples (classes cycle), or None."""
    from apctl.sampling import class_labels

    labels = class_labels(n, label_dim)
    return None if labels is None else labels.argmax(1).numpy()


def write_samples_picture(run: Run, path: Path) -> str:
    """The picture of the model at `run.step`: a teacher-training run's EMA denoiser through EDM's sampler
    (35 NFE), else the evaluation EMA's 2-step samples (2-D: with exact teacher samples overlaid); one
    class per row when conditional. Returns what it shows, for the summary."""
    from apctl.objectives import distills
    from apctl.plots import plot_samples

    if not distills(run.cfg.objective):
        plot_samples(teacher_samples(run), path, labels=_cycling_classes(100, run.data_source.label_dim),
                     title=f"{run.cfg.run.name}: EMA denoiser, EDM sampler, 35 NFE, step {run.step}")
        return "35-NFE samples"
    image = len(run.data_source.shape) == 3
    n = 64 if image else 1024
    samples, reference, sigmas = final_samples(run, n=n)
    plot_samples(samples, path, None if image else reference, labels=_cycling_classes(n, run.data_source.label_dim),
                 title=f"{run.cfg.run.name}: ema weights, 2 NFE (σ = {', '.join(f'{s:.3g}' for s in sigmas)}), step {run.step}",
                 sample_label="student (2 NFE)", reference_label="teacher (exact samples)")
    return "2-step samples"


def finish(run: Run) -> list[str]:
    """Write samples.png (and, for teacher training, the teacher file) and return summary lines."""
    from apctl.objectives import distills

    path = run.run_dir / "samples.png"
    shown = write_samples_picture(run, path)
    if not distills(run.cfg.objective):    # teacher training: export the EMA denoiser
        weights = export_teacher(run)
        return [f"run directory: {run.run_dir}", f"teacher: {weights} (use it with --teacher)", f"{shown}: {path}"]
    lines = [f"run directory: {run.run_dir}", f"{shown}: {path}"]
    last = next((h for h in reversed(run.history) if "align_nfe2" in h), None)
    if last:
        lines.append(f"alignment RMS vs teacher ODE at step {last['step']}: "
                     f"1 step {last['align_nfe1']:.4f}, 2 steps {last['align_nfe2']:.4f}")
    if last and "beyond3_nfe2" in last:     # a Gaussian-mixture teacher: how many samples miss every mode
        lines.append(f"2-step samples beyond 3σ of a mode at step {last['step']}: {last['beyond3_nfe2']:.1%} "
                     f"(teacher ODE {last['beyond3_teacher_ode']:.1%})")
    return lines
