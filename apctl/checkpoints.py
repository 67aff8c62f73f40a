"""Checkpoints: everything needed to resume a run exactly, or to sample and evaluate a student.

A checkpoint is a pair, each file written atomically (`apctl.files`) and the JSON last, so its
presence marks a complete pair:

    checkpoints/ckpt-0001000.safetensors   student.*, target.*, ema.*   network weights
                                          optim.<param>.<name>         optimizer state tensors
                                          precond.lam, .l, .s          Analytic-Precond statistics
    checkpoints/ckpt-0001000.json          format, step, resolved config, student architecture,
                                          optimizer hyper-parameters, teacher fingerprint, last logs

Loading checks the pair before anything uses it (`load_checkpoint`): the JSON's keys and their types,
sizes within bounds (a hand-edited grid_points = 1e9 would make sampling allocate gigabytes), and the
weights against the JSON — every network group the config implies is present, `precond.*` exactly
when the preconditioning needs statistics, and every tensor the shape of the architecture the JSON
describes (built on the meta device, nothing allocated). A run's latest checkpoint that fails these
checks (cut short by a crash of the machine, a full disk, a bad copy) is passed over for the previous
good one by `load_latest_checkpoint`, with a message.

The JSON is strict (`apctl.strict_json`): the student architecture stores a non-finite float (EDM's
sigma_max = inf) as the string "inf", any other non-finite number is null.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from apctl.errors import ApctlError, MissingFileError
from apctl.files import MAX_TEXT_BYTES, MAX_WEIGHTS_BYTES, atomic_write, check_input_file, read_json_bounded, write_safetensors
from apctl.strict_json import decode_nonfinite, dumps, encode_nonfinite

FORMAT = "apctl-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.json$")
# Bounds on what a checkpoint JSON may describe. The grid is tabulated as N(N+1)/2 coefficient pairs;
# network sizes are widths, depths and resolutions (EDM's largest are in the hundreds).
MAX_GRID_POINTS = 10_000
MAX_ARCH_INT = 1 << 20
MAX_ARCH_LIST = 64


class CorruptCheckpointError(ApctlError):
    """A checkpoint pair that cannot be used: unreadable, truncated, or its weights do not fit its JSON."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix.`, with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, step: int, meta: dict[str, Any], networks: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    keep: int | None = None) -> Path:
    """Write `ckpt-<step>.safetensors` then `ckpt-<step>.json` into `directory`; returns the JSON's path.

    Tensors: every network's state_dict under its key in `networks` (`student.*`, ...), the
    optimizer's state tensors (`optim.*`, its scalars and param_groups go to the JSON) and
    `extra_tensors` as named. The JSON is `meta` plus format, version and step. With `keep`, only
    the newest `keep` checkpoints remain.
    """
    tensors: dict[str, torch.Tensor] = {}
    for prefix, net in networks.items():
        for k, v in net.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    meta = dict(meta, format=FORMAT, version=VERSION, step=step)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().cpu().contiguous()
    stem = directory / f"ckpt-{step:07d}"
    write_safetensors(stem.with_suffix(".safetensors"), tensors)
    # Strict JSON: the architecture's non-finite floats as strings (decoded by load_checkpoint), any other
    # non-finite number (a log value) as null.
    if isinstance(meta.get("student"), dict):
        meta["student"] = encode_nonfinite(meta["student"], "string")
    json_path = atomic_write(stem.with_suffix(".json"), dumps(meta, indent=1, default=float))
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)
    return json_path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (their JSON files) in step order."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (→ its latest checkpoint), a checkpoint's .json, or its .safetensors."""
    path = Path(path)
    if path.is_dir():
        for directory in (path / "checkpoints", path):
            found = list_checkpoints(directory)
            if found:
                return found[-1]
        raise MissingFileError(f"no checkpoint in {path} (expected {path}/checkpoints/ckpt-*.json from `apctl distill`)")
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint pair at `path` (a run directory → its latest, a .json or a .safetensors), read
    within bounds; CorruptCheckpointError names the file that does not read. `check_checkpoint` then
    checks its contents (module docstring); `load_checked_checkpoint` does both."""
    from safetensors.torch import load_file

    json_path = resolve_checkpoint(path)
    try:
        meta = read_json_bounded(json_path, "checkpoint", MAX_TEXT_BYTES)
    except MissingFileError:
        raise
    except ApctlError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = "an apctl teacher" if isinstance(meta, dict) and "class_name" in meta else "not an apctl student checkpoint"
        raise ApctlError(f"{json_path} is {what}; pass a run directory or a ckpt-*.json written by `apctl distill`")
    weights = json_path.with_suffix(".safetensors")
    if not weights.exists():
        raise CorruptCheckpointError(f"checkpoint weights missing: {weights}")
    try:
        check_input_file(weights, MAX_WEIGHTS_BYTES, "checkpoint weights")
        tensors = load_file(str(weights))
    except ApctlError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    except Exception as exc:
        raise CorruptCheckpointError(f"{weights} is not a readable safetensors file "
                                     f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if isinstance(meta.get("student"), dict):      # "inf" → inf: the architecture as it was built
        meta["student"] = decode_nonfinite(meta["student"])
    return Checkpoint(json_path, meta, tensors)


def check_checkpoint(ckpt: Checkpoint) -> None:
    """The JSON's keys, types and bounds, then the weights against the JSON (CorruptCheckpointError)."""
    check_meta(ckpt.meta, ckpt.path)
    check_weights(ckpt)


def load_checked_checkpoint(path: str | Path) -> Checkpoint:
    """`load_checkpoint` then `check_checkpoint`: what resuming, sampling and evaluating use."""
    ckpt = load_checkpoint(path)
    check_checkpoint(ckpt)
    return ckpt


def load_latest_checkpoint(directory: Path, message: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint in `directory` that loads and passes its checks, or None when there is none.
    Each newer one passed over is reported through `message`; if every one fails, the newest's error
    is raised (a run is never silently restarted from scratch)."""
    found = list_checkpoints(directory)
    failures: list[str] = []
    for json_path in reversed(found):
        try:
            ckpt = load_checked_checkpoint(json_path)
        except CorruptCheckpointError as exc:
            failures.append(str(exc))
            message(f"checkpoint {json_path.name} is unusable ({exc}); trying the one before it")
            continue
        if failures:
            message(f"resuming from {json_path.name}, the newest usable checkpoint")
        return ckpt
    if failures:
        raise CorruptCheckpointError(f"no usable checkpoint in {directory} ({failures[0]}); move the run "
                                     "directory aside, or pass a new --out, to start afresh")
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_meta(meta: dict, json_path: Path) -> None:
    """The keys a checkpoint JSON must hold, with their types and bounds (CorruptCheckpointError otherwise)."""
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{json_path}: {what}")

    required = {"version": int, "step": int, "config": dict, "student": dict}
    optional = {"teacher_fingerprint": str, "scaler": dict, "logs": dict, "optimizer": dict}
    for key, kind in {**required, **optional}.items():
        if key not in meta:
            if key in required:
                raise bad(f"key '{key}' is missing")
            continue
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"key '{key}' is a {_type_name(value)}, expected a {kind.__name__}")
    if meta["version"] != VERSION:
        raise bad(f"version {meta['version']} is not one this apctl reads ({VERSION})")
    if meta["step"] < 0:
        raise bad(f"step {meta['step']} is negative")
    grid = meta["config"].get("objective", {}).get("grid_points") if isinstance(meta["config"].get("objective"), dict) else None
    if isinstance(grid, int) and not 2 <= grid <= MAX_GRID_POINTS:
        raise bad(f"objective.grid_points = {grid} is outside 2…{MAX_GRID_POINTS}")
    _check_arch_sizes(meta["student"], "student", bad)
    if "optimizer" in meta:
        opt = meta["optimizer"]
        if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars", {}), dict):
            raise bad("key 'optimizer' needs 'param_groups' (a list) and 'scalars' (an object)")


def _check_arch_sizes(value: Any, where: str, bad: Callable[[str], Exception]) -> None:
    """Every integer in the architecture within MAX_ARCH_INT and every list within MAX_ARCH_LIST entries."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_arch_sizes(v, f"{where}.{k}", bad)
    elif isinstance(value, list):
        if len(value) > MAX_ARCH_LIST:
            raise bad(f"{where} has {len(value)} entries (at most {MAX_ARCH_LIST})")
        for i, v in enumerate(value):
            _check_arch_sizes(v, f"{where}[{i}]", bad)
    # Integers only: sizes are integers, while floats such as EDMPrecond's sigma_max may be inf.
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARCH_INT:
        raise bad(f"{where} = {value} is beyond any network apctl builds")


def check_weights(ckpt: Checkpoint) -> None:
    """The weights fit the JSON: the network groups the config implies, `precond.*` exactly when the
    preconditioning needs statistics, and each network's tensors the shapes of the JSON's architecture."""
    from apctl.config import config_from_dict
    from apctl.networks.student import build_student
    from apctl.objectives import distills, uses_target
    from apctl.preconditioning.build import needs_statistics

    path = ckpt.path
    try:
        cfg = config_from_dict(ckpt.meta["config"], source=f"{path} (saved config)")
    except ApctlError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    # A snapshot (training/snapshots.py) holds the evaluation EMA alone.
    snapshot = ckpt.meta.get("snapshot") is True
    groups = ["ema"] if snapshot else ["student", "ema"] + (["target"] if uses_target(cfg.objective) else [])
    for group in groups:
        if not ckpt.group(group):
            raise CorruptCheckpointError(f"{path.with_suffix('.safetensors')} holds no '{group}.*' tensors, "
                                         f"which its JSON ({cfg.objective.kind} objective) implies")
    has_precond = bool(ckpt.group("precond"))
    wants_precond = distills(cfg.objective) and needs_statistics(cfg.precond)
    if has_precond != wants_precond:
        said = f"precond.kind = '{cfg.precond.kind}'"
        raise CorruptCheckpointError(
            f"{path} and its weights disagree: the JSON says {said}, but the weights "
            f"{'lack' if wants_precond else 'hold'} Analytic-Precond statistics (precond.*); the files are mixed up")
    if wants_precond:
        lam = ckpt.group("precond").get("lam")
        if lam is None or lam.ndim != 1 or not 2 <= lam.numel() <= MAX_GRID_POINTS * 100:
            raise CorruptCheckpointError(f"{path}: precond.lam is missing or not a vector of a sane length")
    try:
        with torch.device("meta"):
            skeleton = build_student(ckpt.meta["student"])
    except Exception as exc:
        raise CorruptCheckpointError(f"{path}: its student architecture cannot be built "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for group in groups:
        found = {k: tuple(v.shape) for k, v in ckpt.group(group).items()}
        if found.keys() != expected.keys():
            missing = sorted(expected.keys() - found.keys()) or sorted(found.keys() - expected.keys())
            raise CorruptCheckpointError(f"{path}: the '{group}' weights do not fit the JSON's student architecture "
                                         f"({len(found)} tensors for {len(expected)}; e.g. {missing[0]})")
        wrong = next((k for k in expected if expected[k] != found[k]), None)
        if wrong is not None:
            raise CorruptCheckpointError(f"{path}: {group}.{wrong} has shape {list(found[wrong])}, the JSON's "
                                         f"student architecture needs {list(expected[wrong])}")


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(ckpt.group("optim"), ckpt.meta["optimizer"]))
