"""Checkpoints (apctl/checkpoints.py): what is saved is what is loaded, and a restored optimizer is the same optimizer.

Independent statements: a round trip returns every tensor bit-identical and the metadata unchanged; an
optimizer restored into a fresh instance has an equal state_dict and takes the identical next step (the
resume = re-run guarantee of docs/architecture.md); `keep=n` leaves the n newest; a run directory resolves
to its newest checkpoint. A GradScaler's state travels in the JSON metadata, so it must be JSON data.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from torch import nn

from apctl.checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, restore_optimizer, save_checkpoint
from apctl.errors import ApctlError
from apctl.training.ema import frozen_copy


def save(directory, step, meta, networks, optimizer, *, extra_tensors=None, keep=None):
    """save_checkpoint without a generator: works with the signature with and without `generator`."""
    if "generator" in inspect.signature(save_checkpoint).parameters:
        return save_checkpoint(directory, step, meta, networks, optimizer, None, extra_tensors=extra_tensors, keep=keep)
    return save_checkpoint(directory, step, meta, networks, optimizer, extra_tensors=extra_tensors, keep=keep)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 4))


def _optimizer(kind: str, net: nn.Module) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[kind]
    return cls(net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4)


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))


def _train_step(net, opt, seed):
    opt.zero_grad()
    net(_batch(seed)).pow(2).mean().backward()
    opt.step()


def _trained(kind: str, steps: int = 3):
    net = _student()
    opt = _optimizer(kind, net)
    for n in range(steps):
        _train_step(net, opt, n)
    return net, opt


def _assert_same_state(a: dict, b: dict) -> None:
    """Optimizer state_dicts equal: tensors bit-identical, scalars equal, same param_groups.

    param_groups are compared as JSON data: the checkpoint keeps them in its JSON, so a tuple such as
    Adam's `betas` comes back as a list (torch unpacks either; the next-step test checks the effect)."""
    assert json.loads(json.dumps(a["param_groups"])) == json.loads(json.dumps(b["param_groups"]))
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        assert a["state"][idx].keys() == b["state"][idx].keys(), idx
        for name, value in a["state"][idx].items():
            other = b["state"][idx][name]
            if torch.is_tensor(value):
                assert torch.equal(value, torch.as_tensor(other)), (idx, name)
            else:
                assert value == other, (idx, name)


@pytest.mark.parametrize("kind", ["adam", "radam"])
def test_round_trip_keeps_every_tensor_and_the_metadata(kind, tmp_path):
    """Student/target/EMA weights and buffers, optimizer state and extra tensors load back bit-identical;
    config, step and other metadata come back as given."""
    student, opt = _trained(kind)
    target, ema = frozen_copy(student), frozen_copy(student)
    with torch.no_grad():                                   # three different weight sets
        for p in target.parameters():
            p.mul_(0.5)
        for p in ema.parameters():
            p.add_(0.25)
    extra = {"precond.lam": torch.linspace(-4.4, 6.2, 7, dtype=torch.float64), "precond.l": torch.rand(7)}
    meta = {"config": {"training": {"lr": 1e-2, "batch_size": 16}, "run": {"name": "x"}}, "logs": {"loss": 0.5}}
    networks = {"student": student, "target": target, "ema": ema}
    path = save(tmp_path, 3, meta, networks, opt, extra_tensors=extra)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.meta["step"] == 3
    assert ckpt.meta["config"] == meta["config"] and ckpt.meta["logs"] == meta["logs"]
    for prefix, net in networks.items():
        group = ckpt.group(prefix)
        assert group.keys() == net.state_dict().keys(), prefix
        for name, value in net.state_dict().items():
            assert torch.equal(group[name], value), (prefix, name)
    for name, value in extra.items():
        assert ckpt.tensors[name].dtype == value.dtype and torch.equal(ckpt.tensors[name], value), name
    # optimizer state exists after a few steps (so the check is not vacuous) and comes back
    state = opt.state_dict()
    assert len(state["state"]) == len(list(student.parameters()))
    fresh = _optimizer(kind, _student(seed=1))
    restore_optimizer(fresh, ckpt)
    _assert_same_state(fresh.state_dict(), state)


@pytest.mark.parametrize("kind", ["adam", "radam"])
def test_restored_optimizer_takes_the_identical_next_step(kind, tmp_path):
    """Continuing after a save/load (fresh modules and optimizer) gives the same weights as never stopping."""
    student, opt = _trained(kind)
    save(tmp_path, 3, {}, {"student": student}, opt)
    ckpt = load_checkpoint(tmp_path)
    resumed = _student(seed=7)
    resumed.load_state_dict(ckpt.group("student"))
    resumed_opt = _optimizer(kind, resumed)
    restore_optimizer(resumed_opt, ckpt)
    for n in (3, 4):
        _train_step(student, opt, n)
        _train_step(resumed, resumed_opt, n)
    for (name, a), (_, b) in zip(student.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    _assert_same_state(resumed_opt.state_dict(), opt.state_dict())


def test_grad_scaler_state_travels_in_the_metadata(tmp_path):
    """scaler.state_dict() (after a skipped step moved the scale) is JSON data and restores an equal scaler."""
    net = _student()
    opt = _optimizer("adam", net)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for n in range(4):
        opt.zero_grad()
        loss = net(_batch(n)).pow(2).mean() * (math.inf if n == 1 else 1.0)        # step 1 overflows: backoff
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    state = scaler.state_dict()
    assert state["scale"] == 512.0 and state["_growth_tracker"] == 2
    assert json.loads(json.dumps(state)) == state
    save(tmp_path, 4, {"scaler": state}, {"student": net}, opt)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(tmp_path).meta["scaler"])
    assert restored.state_dict() == state


def test_keep_prunes_older_checkpoints_and_listing_is_by_step(tmp_path):
    """keep=2 leaves the two newest pairs (JSON and weights); list_checkpoints orders by step, not by name."""
    net = _student()
    for step in (5, 100, 20):
        save(tmp_path / "a", step, {}, {"student": net}, None)
    assert [load_checkpoint(p).step for p in list_checkpoints(tmp_path / "a")] == [5, 20, 100]
    for step in (1, 2, 3, 4):
        save(tmp_path / "b", step, {}, {"student": net}, None, keep=2)
    kept = list_checkpoints(tmp_path / "b")
    assert [load_checkpoint(p).step for p in kept] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        f"ckpt-{s:07d}.{ext}" for s in (3, 4) for ext in ("json", "safetensors"))
    assert list_checkpoints(tmp_path / "missing") == []


def test_resolve_checkpoint_accepts_run_dir_json_and_safetensors(tmp_path):
    """A run directory (its checkpoints/ folder) or a checkpoint folder gives the newest; .json and
    .safetensors name one pair; anything else is an ApctlError."""
    net = _student()
    run = tmp_path / "run"
    first = save(run / "checkpoints", 10, {}, {"student": net}, None)
    newest = save(run / "checkpoints", 200, {}, {"student": net}, None)
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(run / "checkpoints") == newest
    assert resolve_checkpoint(first) == first
    assert resolve_checkpoint(first.with_suffix(".safetensors")) == first
    assert load_checkpoint(str(first.with_suffix(".safetensors"))).step == 10
    for bad in (tmp_path / "empty", run / "checkpoints" / "ckpt-0000011.json"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ApctlError):
            resolve_checkpoint(bad)
