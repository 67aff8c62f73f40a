"""Checkpoints: everything needed to resume a run exactly, or to sample and evaluate a student.

A checkpoint is a pair, each file written atomically (`apctl.files`) and the JSON last, so its
presence marks a complete pair:

    checkpoints/ckpt-0001000.safetensors   student.*, target.*, ema.*   network weights
                                          optim.<param>.<name>         optimizer state tensors
                                          precond.lam, .l, .s          Analytic-Precond statistics
    checkpoints/ckpt-0001000.json          format, step, resolved config, student architecture,
                                          optimizer hyper-parameters, teacher fingerprint, last logs

The JSON is strict (`apctl.strict_json`): the student architecture stores a non-finite float (EDM's
sigma_max = inf) as the string "inf", any other non-finite number is null.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apctl.errors import ApctlError, MissingFileError
from apctl.files import atomic_path, atomic_write
from apctl.strict_json import dumps

FORMAT = "apctl-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.json$")


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
    from safetensors.torch import save_file

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
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    # Strict JSON: a non-finite log value is null (callers encode what must rebuild, e.g. the architecture).
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
    from safetensors.torch import load_file

    json_path = resolve_checkpoint(path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApctlError(f"{json_path} is not a readable checkpoint ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = "an apctl teacher" if isinstance(meta, dict) and "class_name" in meta else "not an apctl student checkpoint"
        raise ApctlError(f"{json_path} is {what}; pass a run directory or a ckpt-*.json written by `apctl distill`")
    weights = json_path.with_suffix(".safetensors")
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError:
        raise MissingFileError(f"checkpoint weights missing: {weights}") from None
    except Exception as exc:
        raise ApctlError(f"{weights} is not a readable safetensors file ({exc})") from None
    return Checkpoint(json_path, meta, tensors)


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(ckpt.group("optim"), ckpt.meta["optimizer"]))
