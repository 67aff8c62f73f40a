"""A distillation run: build every part from the config, train, checkpoint, resume by re-running.

Read top to bottom: `prepare` builds the teacher, data, statistics, preconditioning, objective,
student, target network θ⁻, evaluation EMA and optimizer, and restores the latest checkpoint of
the run directory if there is one; `train` is the loop. Every random draw of step k comes from
a generator seeded by (run seed, rank, k), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from apctl.checkpoints import list_checkpoints, load_checkpoint, restore_optimizer, save_checkpoint
from apctl.config import Config, config_to_toml
from apctl.errors import ApctlError
from apctl.training import distributed
from apctl.training.ema import ema_update, frozen_copy

# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("training.iterations", "training.log_every", "training.checkpoint_every",
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
    stats: Any
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


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of one training step: independent across (seed, rank, step), reproducible."""
    entropy = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ApctlError("run.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
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


def build_teacher_and_data(cfg: Config):
    """The teacher and the source of training batches (loads teacher and data files)."""
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.teachers import build_teacher

    data = load_training_data(cfg)
    teacher = build_teacher(cfg, data)
    return teacher, build_data_source(cfg, teacher, data)


def build_preconditioning_for(cfg: Config, teacher, data_source, reporter: Reporter, stats_cache: Path | None):
    """Statistics (Analytic-Precond only: from file, cache or estimated) and the preconditioning."""
    from apctl.preconditioning.build import build_preconditioning, obtain_statistics

    stats = None
    if cfg.precond.kind == "analytic":
        stats, origin = obtain_statistics(cfg, teacher, data_source, stats_cache, reporter.statistics_progress)
        reporter.message(f"Analytic-Precond statistics: {origin} ({len(stats.lam)} levels)")
    return stats, build_preconditioning(cfg, stats)


def prepare(cfg: Config, run_dir: Path, reporter: Reporter | None = None) -> Run:
    from apctl.networks.student import build_student, student_architecture
    from apctl.objectives import build_objective

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
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # Files are read before anything is written: a missing teacher or data set leaves no run directory.
    teacher, data_source = build_teacher_and_data(cfg)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_to_toml(cfg))
        if latest is None:
            # A fresh run: logs of an earlier attempt that never reached a checkpoint are stale.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    # Only rank 0 estimates statistics; the others then read its cache.
    stats_cache = run_dir / "precond_stats.safetensors"
    if not distributed.is_main():
        distributed.barrier()
    stats, precond = build_preconditioning_for(cfg, teacher, data_source, reporter, stats_cache)
    if distributed.is_main():
        distributed.barrier()
    if hasattr(teacher, "to"):
        teacher.to(device)

    torch.manual_seed(cfg.run.seed)
    arch = student_architecture(cfg, teacher.shape, data_source.label_dim, teacher)
    student = build_student(arch, teacher, cfg.student.init_from_teacher).to(device)
    target, ema = frozen_copy(student), frozen_copy(student)
    opt_cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[cfg.training.optimizer]
    optimizer = opt_cls(student.parameters(), lr=cfg.training.lr)
    objective = build_objective(cfg, teacher, precond)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.training.precision == "fp16")
    run = Run(cfg, run_dir, teacher, data_source, stats, precond, objective, student, target, ema, optimizer,
              arch, device, scaler)
    if latest is not None:
        run.student.load_state_dict(latest.group("student"))
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
        path.write_text("".join(ln + "\n" for ln in lines))


def save(run: Run, logs: dict | None = None) -> Path | None:
    if not distributed.is_main():
        return None
    extra = {}
    if run.stats is not None:
        extra = {f"precond.{k}": torch.from_numpy(getattr(run.stats, k)) for k in ("lam", "l", "s")}
    meta = {"config": run.cfg.to_dict(), "student": run.arch, "teacher_fingerprint": run.teacher.fingerprint(),
            "precond": {"kind": run.cfg.precond.kind, "form": run.cfg.precond.form,
                        "interpolation": run.cfg.precond.interpolation},
            "scaler": run.scaler.state_dict(), "logs": logs or {}}
    return save_checkpoint(run.checkpoint_dir, run.step, meta,
                           {"student": run.student, "target": run.target, "ema": run.ema},
                           run.optimizer, extra, keep=run.cfg.training.keep_checkpoints)


def _autocast(run: Run):
    precision = run.cfg.training.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(run.device.type, dtype=dtype)


def _log(run: Run, path: Path, logs: dict) -> None:
    run.history.append(logs)
    if distributed.is_main():
        with open(path, "a") as fh:
            fh.write(json.dumps(logs) + "\n")


def train(run: Run, reporter: Reporter | None = None, probe=None) -> Run:
    """Run the loop from `run.step` to `training.iterations`, checkpointing along the way.

    `probe(run) -> dict` (e.g. the EMA student's alignment with the teacher) is evaluated every
    `training.eval_every` steps and logged; it draws no training randomness.
    """
    reporter = reporter or SilentReporter()
    cfg, tc = run.cfg, run.cfg.training
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = tc.batch_size // world
    model = run.student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(run.student)
    scaler = run.scaler
    metrics_path = run.run_dir / "metrics.jsonl"
    if probe is not None and tc.eval_every and run.step == 0:
        _log(run, metrics_path, dict(probe(run), step=0))
    reporter.start(run.step, tc.iterations)
    clock, last_logged = time.perf_counter(), run.step
    logs: dict[str, float] = {}
    while run.step < tc.iterations:
        gen = step_generator(cfg.run.seed, rank, run.step)
        x0, labels = run.data_source.sample(per_rank, gen)
        x0 = x0.to(run.device)
        labels = None if labels is None else labels.to(run.device)
        with _autocast(run):
            loss, logs = run.objective(model, run.target, x0, labels, gen)
        run.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.student.parameters(), tc.grad_clip)
        scaler.step(run.optimizer)
        scaler.update()
        ema_update(run.target, run.student, cfg.objective.target_ema)
        ema_update(run.ema, run.student, tc.ema_decay)
        run.step += 1

        evaluate = probe is not None and tc.eval_every and run.step % tc.eval_every == 0
        if run.step % tc.log_every == 0 or run.step == tc.iterations or evaluate:
            now = time.perf_counter()
            logs = dict(logs, step=run.step, it_per_s=(run.step - last_logged) / max(now - clock, 1e-9))
            clock, last_logged = now, run.step
            if evaluate:
                logs.update(probe(run))
            _log(run, metrics_path, logs)
        reporter.step(run.step, logs)
        if run.step % tc.checkpoint_every == 0 and run.step < tc.iterations:
            save(run, logs)
    save(run, logs)
    reporter.finish()
    return run
