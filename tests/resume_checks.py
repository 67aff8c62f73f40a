"""Resume by re-running: a run trained in one call against the same run trained in two."""

from __future__ import annotations

from pathlib import Path

import torch


def whole_and_split(cli, tmp_path: Path, preset: str, sets: list[str], total: int, first: int):
    """The last checkpoints of `preset` trained for `total` iterations in one `apctl distill` call ("whole") and
    for `first`, then re-run to `total` ("split"), both with the `--set` overrides `sets`."""
    from apctl.checkpoints import list_checkpoints, load_checkpoint

    def args(iterations: int) -> list[str]:
        return [a for s in [*sets, f"training.iterations={iterations}"] for a in ("--set", s)]

    cli.ok(cli(["distill", "--preset", preset, "--out", "whole", *args(total)], tmp_path))
    cli.ok(cli(["distill", "--preset", preset, "--out", "split", *args(first)], tmp_path))
    cli.ok(cli(["distill", "--preset", preset, "--out", "split", *args(total)], tmp_path))
    return tuple(load_checkpoint(list_checkpoints(tmp_path / name / "checkpoints")[-1]) for name in ("whole", "split"))


def assert_same_weights(a, b, groups=("student", "ema")) -> None:
    """Every tensor of every group equal, bit for bit."""
    for group in groups:
        x, y = a.group(group), b.group(group)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), group
