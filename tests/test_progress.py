"""What a log file sees (issue 9): a start banner, plain timestamped progress lines, metrics rows with wall time,
lr and memory, and a last line that describes the final model."""

from __future__ import annotations

import json
import math
import re


def test_a_run_under_a_log_file_is_followable(tmp_path, cli):
    """stdout is a file here (not a TTY): the banner names version, device, processes and run directory; progress
    comes as timestamped lines (APCTL_LOG_SECONDS=0: every step); the final model (step 20, not a multiple of
    eval_every = 15) is measured, and the last line reports that step."""
    result = cli.ok(cli(["distill", "--preset", "toy2d", "--out", "run", "--set", "training.iterations=20",
                         "--set", "training.eval_every=15", "--set", "training.log_every=5",
                         "--set", "precond.statistics.n_points=16", "--set", "precond.statistics.n_samples=64",
                         "--set", "eval.n_samples=64", "--set", "eval.teacher_steps=8"],
                        tmp_path, env=cli.env(APCTL_LOG_SECONDS="0")))
    out = result.stdout
    assert re.search(r"apctl \d+\.\d+\.\d+ distill: device cpu, 1 process\(es\), run directory run", out), out
    assert "  objective: CTM" in out                                       # the resolved plan follows the banner
    stamped = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  distill  (\d+)/20 \(\d+%\)  \S+/s  ETA \S+", out, re.M)
    assert [int(s) for s in stamped][-1] == 20 and len(stamped) >= 10, out
    probed = re.findall(r"^.*  distill  (\d+)/20 .* · align@2 (\S+) · beyond 3σ@2 (\S+)%$", out, re.M)
    assert int(probed[0][0]) == 15 and int(probed[-1][0]) == 20, out      # from the first probe on, its two figures
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "align_nfe2" in r] == [0, 15, 20]
    trained = [r for r in rows if "loss" in r]
    assert all({"time", "lr", "peak_memory_mb", "grad_norm"} <= r.keys() for r in trained)
    from apctl.presets import load_config

    tc = load_config("toy2d")[0].training                # lr held over the first 6 of 20 steps, then linear to 0
    assert tc.lr_schedule == "linear" and tc.lr_warmup == 0 and tc.lr_hold == 0.3
    # a row at step k logs the rate of the last step taken, k − 1 (training/schedule.py)
    assert all(math.isclose(r["lr"], tc.lr * min(1.0, 1 - (r["step"] - 1 - 6) / 14), rel_tol=1e-12)
               and r["peak_memory_mb"] > 0 for r in trained), [r["lr"] for r in trained]
    alignment, beyond = out.strip().splitlines()[-2:]       # a Gaussian-mixture run ends with both, for one step
    assert alignment.startswith("alignment RMS vs teacher ODE at step 20:"), out
    assert beyond.startswith("2-step samples beyond 3σ of a mode at step 20:"), out
    last = [r for r in rows if "beyond3_nfe2" in r][-1]
    assert probed[-1][1:] == (f"{last['align_nfe2']:.4f}", f"{100 * last['beyond3_nfe2']:.1f}")


def test_version(tmp_path, cli):
    from apctl import __version__

    assert cli.ok(cli(["--version"], tmp_path)).stdout.strip() == f"apctl {__version__}"
