"""Faults: the run lock, signals, a full disk, corrupt checkpoints, a cut-short metrics line.

The reference for every resumption is an uninterrupted run of the same config in this process:
a stopped-and-resumed run must end with bit-identical tensors.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apctl.checkpoints import list_checkpoints, load_checked_checkpoint
from apctl.errors import ApctlError, RunStopped, WriteError
from apctl.presets import load_config
from apctl.training.run import prepare, train
from tiny_runs import TINY_TOY2D

TINY = TINY_TOY2D + """[training]
iterations = 12
batch_size = 8
log_every = 1
checkpoint_every = 4
keep_checkpoints = 3
eval_every = 0
lr_schedule = "constant"   # the tests stop runs early and extend them; toy2d's decaying lr would refuse that
"""


class Messages:
    """A reporter that keeps the engine's messages."""

    def __init__(self):
        self.lines: list[str] = []

    def message(self, text): self.lines.append(text)
    def statistics_progress(self, done, total): pass
    def start(self, start_step, total_steps, terms): pass
    def step(self, step, logs): pass
    def finish(self): pass


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "tiny.toml"
    path.write_text(TINY)
    return path


def _cfg(preset: Path, *overrides: str):
    return load_config(str(preset), list(overrides))[0]


def _run(cfg, out: Path, reporter=None, probe=None):
    run = prepare(cfg, out, reporter)
    try:
        train(run, reporter, probe)
    finally:
        run.close()
    return run


@pytest.fixture(scope="module")
def reference(preset, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final checkpoint's tensors of an uninterrupted 12-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_cfg(preset), out)
    return load_file(str(list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")))


def _final(out: Path) -> tuple[int, dict[str, torch.Tensor]]:
    last = list_checkpoints(out / "checkpoints")[-1]
    return json.loads(last.read_text())["step"], load_file(str(last.with_suffix(".safetensors")))


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# Signals (in-process: the probe, evaluated after a step, sends the signal to this process)


def _signalling_probe(at_step: int, signals: tuple[int, ...]):
    def probe(run):
        if run.step == at_step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return {}
    return probe


def test_sigint_saves_the_current_step_and_resumes_identically(preset, reference, tmp_path):
    cfg = _cfg(preset, "training.eval_every=1")
    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunStopped) as stopped:
        _run(cfg, out, probe=_signalling_probe(6, (signal.SIGINT,)))
    assert stopped.value.exit_code == 130
    message = str(stopped.value)
    assert "\n" not in message and "SIGINT" in message and "step 6 of 12" in message and "ckpt-0000006.json" in message
    assert signal.getsignal(signal.SIGINT) is previous          # handlers restored
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "ckpt-0000006.json"
    _run(cfg, out)                                              # resume by re-running
    step, tensors = _final(out)
    assert step == 12
    _assert_identical(tensors, reference)


def test_second_signal_stops_at_once(preset, tmp_path):
    cfg = _cfg(preset, "training.eval_every=1")
    out = tmp_path / "run"
    with pytest.raises(RunStopped) as stopped:
        _run(cfg, out, probe=_signalling_probe(6, (signal.SIGTERM, signal.SIGTERM)))
    assert stopped.value.exit_code == 143 and "second SIGTERM" in str(stopped.value)
    # no checkpoint at step 6: the one from step 4 is the latest
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "ckpt-0000004.json"


class SignalDuringStatistics(Messages):
    """A reporter that sends `sig` to this process when the statistics report their first progress."""

    def __init__(self, sig: int):
        super().__init__()
        self.sig = sig

    def statistics_progress(self, done, total):
        os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_statistics_stops_at_once_and_leaves_nothing(preset, tmp_path, sig, code):
    """Before the loop there is no step to save: one line naming the phase, the handlers restored, and a
    fresh run leaves no directory behind (the statistics cache is only ever written whole)."""
    out = tmp_path / "run"
    previous = signal.getsignal(sig)
    with pytest.raises(RunStopped) as stopped:
        _run(_cfg(preset), out, SignalDuringStatistics(sig))
    message = str(stopped.value)
    assert stopped.value.exit_code == code and "\n" not in message
    assert message.startswith(f"{signal.Signals(sig).name} during the Analytic-Precond statistics")
    assert signal.getsignal(sig) is previous
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The lock and SIGTERM through the real command line (subprocesses)


def _cli(args, cwd, **kw):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1",
               COLUMNS="250", NO_COLOR="1", TERM="dumb")
    return subprocess.Popen([sys.executable, "-m", "apctl.cli.main", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_lock_refuses_a_second_writer_and_sigterm_stops_with_a_checkpoint(preset, reference, tmp_path):
    args = ["distill", "--preset", str(preset), "--out", "run", "--set", "training.iterations=100000"]
    first = _cli(args, tmp_path)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        config_before = (tmp_path / "run" / "config.toml").read_bytes()
        second = _cli(args, tmp_path)
        _, err = second.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert second.returncode == 1 and len(lines) == 1, err
        assert f"pid {first.pid} on host " in lines[0] and "in use" in lines[0]
        assert (tmp_path / "run" / "config.toml").read_bytes() == config_before
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert first.returncode == 143 and len(lines) == 1 and "Traceback" not in err, err
    assert "SIGTERM: stopped at step" in lines[0] and "re-run the same command to resume" in lines[0]
    stopped_at = int(lines[0].split("stopped at step ")[1].split()[0])
    assert json.loads(list_checkpoints(tmp_path / "run" / "checkpoints")[-1].read_text())["step"] == stopped_at
    assert stopped_at >= 2
    # Resume to step 12 + stopped_at and compare with an uninterrupted run to that step.
    total = stopped_at + 3
    _run(_cfg(preset, f"training.iterations={total}"), tmp_path / "run")
    expected_dir = tmp_path / "expected"
    _run(_cfg(preset, f"training.iterations={total}"), expected_dir)
    _assert_identical(_final(tmp_path / "run")[1], _final(expected_dir)[1])


def test_a_stale_lock_is_taken_over_with_a_message(preset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0}))
    messages = Messages()
    _run(_cfg(preset, "training.iterations=2"), out, messages)
    assert any("taking over the stale lock of pid 999999 on host gone" in m for m in messages.lines), messages.lines


# ------------------------------------------------------------------------------------------------
# A full disk, corrupt checkpoints, a cut-short metrics line


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous(preset, tmp_path, monkeypatch):
    import apctl.files as files

    out = tmp_path / "run"
    real_open = open
    calls = {"n": 0}

    def full_disk_open(path, mode="r", *a, **kw):
        # the second checkpoint's weights: fail as a full disk would, mid-file
        if "w" in mode and str(path).endswith(".tmp") and "ckpt-0000008.safetensors" in str(path):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(files, "open", full_disk_open, raising=False)
    with pytest.raises(WriteError) as failed:
        _run(_cfg(preset), out)
    assert calls["n"] == 1
    message = str(failed.value)
    assert "\n" not in message and "No space left on device" in message and "ckpt-0000008.safetensors" in message
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-0000004.json"]
    assert load_checked_checkpoint(out / "checkpoints" / "ckpt-0000004.json").step == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(preset, reference, tmp_path):
    cfg = _cfg(preset)
    out = tmp_path / "run"
    _run(_cfg(preset, "training.iterations=8"), out)            # checkpoints at 4 and 8
    weights = out / "checkpoints" / "ckpt-0000008.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])   # cut short
    (out / "checkpoints" / ".ckpt-0000009.json.0123abcd.tmp").write_text("left by a killed writer")
    messages = Messages()
    run = prepare(cfg, out, messages)
    assert run.step == 4
    assert any("ckpt-0000008.json is unusable" in m for m in messages.lines), messages.lines
    assert not list((out / "checkpoints").glob("*.tmp"))
    train(run)
    run.close()
    _assert_identical(_final(out)[1], reference)


def test_checkpoint_json_paired_with_other_weights_is_refused(preset, tmp_path):
    out = tmp_path / "run"
    _run(_cfg(preset, "training.iterations=4"), out)
    ckpt = out / "checkpoints" / "ckpt-0000004.json"
    meta = json.loads(ckpt.read_text())
    meta["config"]["precond"]["kind"] = "ctm"                    # the weights hold Analytic-Precond's tensors
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(ApctlError) as refused:
        load_checked_checkpoint(ckpt)
    assert "precond.kind = 'ctm'" in str(refused.value) and "\n" not in str(refused.value)


def test_cut_short_metrics_line_does_not_stop_a_resume(preset, reference, tmp_path):
    out = tmp_path / "run"
    _run(_cfg(preset, "training.iterations=8"), out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "loss": 0.1')                      # the process died mid-line
    _run(_cfg(preset), out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, 13))
    _assert_identical(_final(out)[1], reference)


def test_failed_fresh_run_leaves_nothing(preset, tmp_path, monkeypatch):
    import apctl.training.run as run_module

    def broken(*a, **kw):
        raise ApctlError("injected failure after the statistics")

    monkeypatch.setattr(run_module, "frozen_copy", broken)
    with pytest.raises(ApctlError):
        prepare(_cfg(preset), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ApctlError):
        prepare(_cfg(preset), existing)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
