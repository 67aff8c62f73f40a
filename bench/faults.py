"""Fault benchmark (issue 11): SIGKILL a tiny distillation at random moments, resume by re-running, compare.

One uninterrupted run of a tiny toy2d config (`checkpoint_every = 1`, so most of the training time is
spent writing checkpoints, and Analytic-Precond statistics estimated at the start) gives the
reference final checkpoint. Each SIGKILL trial starts the same command in a fresh run directory,
kills it with SIGKILL at a moment triggered by an event, so that it lands where intended however
loaded the machine is: 30% at a random time into the statistics estimate (after the lock appears),
70% at a random time into the step after a random checkpoint k (its training and the write of
checkpoint k + 1); optionally kills the resumed process again, then re-runs the command until it exits. Counted per trial:

* bit-identical: the final checkpoint's tensors equal the reference's (torch.equal, every tensor);
* corrupt checkpoints: after every kill, each `ckpt-*.json` in the run directory is loaded with
  `apctl.checkpoints.load_checked_checkpoint` (its JSON, weights and cross-checks) — any that fails counts;
* refused resumes: a re-run that exits non-zero.

SIGTERM trials start the command, wait for the first metrics lines, send SIGTERM, expect exit 143
and a checkpoint at the step the message names, re-run, and compare with the reference.

    OMP_NUM_THREADS=1 python bench/faults.py                       # 20 SIGKILL + 3 SIGTERM trials
    OMP_NUM_THREADS=1 python bench/faults.py --kill-trials 5 --term-trials 1 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PRESET = """extends = "toy2d"
[run]
name = "faults"
[student]
hidden = 32
depth = 2
embed_dim = 16
[precond.statistics]
n_points = 40
n_samples = 1024
batch_size = 1024
[training]
iterations = 60
batch_size = 32
log_every = 1
checkpoint_every = 1
keep_checkpoints = 2
eval_every = 0
"""


def command(preset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "apctl.cli.main", "distill", "--preset", str(preset), "--out", str(out)]


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1", TERM="dumb")


def run_to_end(preset: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(preset, out), env=environment(), capture_output=True, text=True, timeout=900)


def final_tensors(out: Path):
    from safetensors.torch import load_file

    from apctl.checkpoints import list_checkpoints

    last = list_checkpoints(out / "checkpoints")[-1]
    return json.loads(last.read_text())["step"], load_file(str(last.with_suffix(".safetensors")))


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def corrupt_checkpoints(out: Path) -> list[str]:
    """Checkpoint pairs in the run directory that do not load (JSON present = pair claimed complete)."""
    from apctl.checkpoints import list_checkpoints, load_checked_checkpoint
    from apctl.errors import ApctlError

    bad = []
    for path in list_checkpoints(out / "checkpoints"):
        try:
            load_checked_checkpoint(path)
        except ApctlError as exc:
            if path.exists():          # not pruned by a process between listing and loading
                bad.append(f"{path.name}: {exc}")
    return bad


def phase(out: Path) -> str:
    """Where the killed process was, judged from what it left."""
    from apctl.checkpoints import list_checkpoints

    if not (out / "precond_stats.safetensors").exists():
        return "start-up/statistics"
    found = list_checkpoints(out / "checkpoints")
    temporaries = [p for p in (out / "checkpoints").glob(".*.tmp")] if (out / "checkpoints").is_dir() else []
    where = f"training (last checkpoint {found[-1].stem})" if found else "before the first checkpoint"
    return where + (", mid-write" if temporaries else "")


def timed_reference(preset: Path, out: Path) -> tuple[float, float]:
    """Run the reference to the end; returns how long the statistics took (from the lock, taken just
    before them, to their file) and the mean time of one training step with its checkpoint write."""
    started = time.monotonic()
    proc = subprocess.Popen(command(preset, out), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    t_lock = t_stats = t_first = None
    while proc.poll() is None:
        now = time.monotonic() - started
        if t_lock is None and (out / ".lock").exists():
            t_lock = now
        if t_stats is None and (out / "precond_stats.safetensors").exists():
            t_stats = now
        if t_first is None and (out / "checkpoints" / "ckpt-0000001.json").exists():
            t_first = now
        time.sleep(0.005)
    if proc.returncode != 0 or None in (t_lock, t_stats, t_first):
        sys.exit(f"reference run failed: {proc.stderr.read().strip().splitlines()[-1:]}")
    from apctl.checkpoints import list_checkpoints

    last = list_checkpoints(out / "checkpoints")[-1]
    steps = json.loads(last.read_text())["step"]
    return t_stats - t_lock, (last.stat().st_mtime - (out / "checkpoints" / "ckpt-0000001.json").stat().st_mtime
                              if (out / "checkpoints" / "ckpt-0000001.json").exists() else 1.0) / max(steps - 1, 1)


def _wait_for(proc: subprocess.Popen, ready) -> bool:
    while not ready():
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def kill_trial(preset: Path, out: Path, reference: dict, timing, rng: random.Random, kills: int) -> dict:
    """Each kill is triggered by an event, so it lands where intended however loaded the machine is:
    30% at a random moment of the statistics estimate (after the lock appears), 70% at a random
    moment of the step after a random checkpoint k (its training and the next checkpoint write)."""
    stats_seconds, step_seconds = timing
    iterations = reference["step"]
    record = {"kills": [], "corrupt": [], "refused": 0}
    for _ in range(kills):
        proc = subprocess.Popen(command(preset, out), env=environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if rng.random() < 0.3:
            target = "statistics"
            ready = lambda: (out / ".lock").exists() and (out / ".lock").stat().st_size > 0  # noqa: E731
            delay = rng.uniform(0, 0.9 * stats_seconds)
        else:
            k = rng.randint(1, iterations - 1)
            target = f"after checkpoint {k}"
            ready = lambda: (out / "checkpoints" / f"ckpt-{k:07d}.json").exists()  # noqa: E731
            delay = rng.uniform(0, step_seconds)
        if _wait_for(proc, ready) and proc.poll() is None:
            time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            record["kills"].append(f"{target} +{delay:.2f}s: {phase(out)}")
        else:
            record["kills"].append(f"{target}: ended first (exit {proc.returncode})")
            if proc.returncode != 0:
                record["refused"] += 1
        record["corrupt"] += corrupt_checkpoints(out)
    done = run_to_end(preset, out)
    if done.returncode != 0:
        record["refused"] += 1
        record["error"] = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
        record["identical"] = False
        return record
    step, tensors = final_tensors(out)
    record["identical"] = step == reference["step"] and identical(tensors, reference["tensors"])
    return record


def term_trial(preset: Path, out: Path, reference: dict) -> dict:
    proc = subprocess.Popen(command(preset, out), env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and proc.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    record = {"exit": proc.returncode, "message": lines[-1] if lines else ""}
    from apctl.checkpoints import list_checkpoints

    named = record["message"].split("stopped at step ")[1].split()[0] if "stopped at step " in record["message"] else None
    latest = list_checkpoints(out / "checkpoints")
    record["checkpoint_matches"] = bool(named and latest and json.loads(latest[-1].read_text())["step"] == int(named))
    record["one_line"] = len(lines) == 1 and "Traceback" not in err
    done = run_to_end(preset, out)
    record["resumed"] = done.returncode == 0
    record["identical"] = done.returncode == 0 and identical(final_tensors(out)[1], reference["tensors"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-trials", type=int, default=20)
    parser.add_argument("--term-trials", type=int, default=3)
    parser.add_argument("--max-kills", type=int, default=2, help="SIGKILLs per trial: 1 … this many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="apctl-faults-") as tmp:
        root = Path(tmp)
        preset = root / "faults.toml"
        preset.write_text(PRESET)
        started = time.monotonic()
        timing = timed_reference(preset, root / "reference")
        step, tensors = final_tensors(root / "reference")
        reference = {"step": step, "tensors": tensors}
        print(f"reference: {step} steps, {len(tensors)} tensors, {time.monotonic() - started:.0f} s; statistics "
              f"{timing[0]:.2f} s, {timing[1] * 1000:.0f} ms per step with its checkpoint write")

        kills = identical_count = refused = corrupt = 0
        for i in range(args.kill_trials):
            record = kill_trial(preset, root / f"kill{i}", reference, timing, rng, rng.randint(1, args.max_kills))
            kills += len(record["kills"])
            identical_count += record["identical"]
            refused += record["refused"]
            corrupt += len(record["corrupt"])
            print(f"kill trial {i + 1:2d}: {'; '.join(record['kills'])} → "
                  f"{'identical' if record['identical'] else 'DIFFERENT'}"
                  + (f", corrupt: {record['corrupt']}" if record["corrupt"] else "")
                  + (f", refused {record['refused']}: {record.get('error')}" if record["refused"] else ""), flush=True)
        term_ok = 0
        for i in range(args.term_trials):
            record = term_trial(preset, root / f"term{i}", reference)
            ok = record["exit"] == 143 and record["checkpoint_matches"] and record["one_line"] and record["identical"]
            term_ok += ok
            print(f"SIGTERM trial {i + 1}: exit {record['exit']}, {record['message']!r}, checkpoint at that step: "
                  f"{record['checkpoint_matches']}, resumed identical: {record['identical']}", flush=True)
        print(f"\nSIGKILL: {args.kill_trials} trials, {kills} kills: {identical_count}/{args.kill_trials} bit-identical "
              f"finals, {corrupt} corrupt checkpoints, {refused} refused resumes")
        print(f"SIGTERM: {term_ok}/{args.term_trials} clean stops (exit 143, one line, checkpoint at the named step) "
              f"resumed bit-identical")
        print(f"total wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
