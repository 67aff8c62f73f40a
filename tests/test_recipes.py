"""End-to-end recipes through the real CLI: distill → sample → eval → precond, exact resume, refusing a
changed config, the CD objective, the CPU image preset and mixed precision.

Budget: the whole file is meant to take at most ~4 minutes on a quiet 2-core machine (run with
OMP_NUM_THREADS=1). To fit, the long toy2d distillation (a.) starts in the background when the module
starts and its tests come last; independent commands run two at a time. The tests marked `slow` are
still run by default (`-m "not slow"` skips them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Short but real: the preset's lr 3e-3, held for 30% of these 1,200 iterations, and everything else as shipped;
# statistics on 1,024 samples. Measured (torch 2.14.1, seed 0) 2-step alignment RMS vs. the teacher ODE, 512
# probes: step 0: 0.496   600: 0.060 (8.2×)   1200: 0.027 (18×): the 5× bar with 3.7× headroom (~20 s of training).
TOY_ITERATIONS = 1200
TOY_EVAL_EVERY = 600   # must divide TOY_ITERATIONS so the final step carries an alignment measurement
TOY_OVERRIDES = [
    f"training.iterations={TOY_ITERATIONS}",
    "precond.statistics.n_samples=1024",
    "eval.n_samples=512",
    "eval.teacher_steps=128",
    f"training.eval_every={TOY_EVAL_EVERY}",
    f"training.checkpoint_every={TOY_EVAL_EVERY}",
]


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert path.stat().st_size > 2000, f"{path} is suspiciously small"


@pytest.fixture(scope="module", autouse=True)
def _toy_run_in_background(request, tmp_path_factory, cli):
    """The toy2d distillation (a.) is the longest single step: start it when the module starts, so that it
    trains on one core while the other tests use the other; its tests come last and wait for it.
    Started only when a selected test needs it (`-k` friendly), killed if still running at the end."""
    if not any("toy_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    ws = tmp_path_factory.mktemp("toy2d")
    background = cli.background(["distill", "--preset", "toy2d", "--out", "run", *_sets(TOY_OVERRIDES)], ws, "distill")
    try:
        yield ws, background
    finally:
        background.kill()


def checkpoint_tensors(run_dir: Path, step: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    stem = run_dir / "checkpoints" / f"ckpt-{step:07d}"
    return load_file(str(stem.with_suffix(".safetensors"))), json.loads(stem.with_suffix(".json").read_text())


# ------------------------------------------------------------------------------------------------
# b, c. Exact resume by re-running the same command; a changed config is refused.

RESUME_N = 40
# Run B is extended from RESUME_N/2 to RESUME_N iterations, which a decaying lr schedule (toy2d's
# ends at training.iterations) refuses; the extension is what this test resumes, so the schedule is constant.
CTM_RESUME = ["training.eval_every=0", "training.log_every=10", "training.lr_schedule=constant"]


def _distill(cli, ws, out, preset, overrides):
    return cli.ok(cli(["distill", "--preset", preset, "--out", out, *_sets(overrides)], ws))


def _distill_both(cli, ws, preset, overrides, n):
    """Run A (n iterations) and the first half of run B (n/2) side by side; both must succeed."""
    jobs = [(["distill", "--preset", preset, "--out", out, *_sets(overrides + [f"training.iterations={iters}"])], ws)
            for out, iters in (("A", n), ("B", n // 2))]
    return [cli.ok(r) for r in cli.parallel(jobs)]


def assert_same_checkpoint(a_dir: Path, b_dir: Path, step: int) -> None:
    import torch

    a, a_meta = checkpoint_tensors(a_dir, step)
    b, b_meta = checkpoint_tensors(b_dir, step)
    assert a.keys() == b.keys()
    for group in ("student.", "target.", "ema.", "optim."):
        assert any(k.startswith(group) for k in a), f"checkpoint has no {group}* tensors"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:8]}"
    assert a_meta["optimizer"] == b_meta["optimizer"]
    assert a_meta["step"] == b_meta["step"] == step


def assert_same_logs(a_dir: Path, b_dir: Path) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    b_steps = [m["step"] for m in b]
    assert b_steps == sorted(set(b_steps)), f"duplicate or unordered steps in metrics.jsonl: {b_steps}"
    b_by_step = {m["step"]: m for m in b}
    for m in a:                                 # every value A logged, B logged identically (except clock and memory)
        assert m["step"] in b_by_step, m["step"]
        for key, value in m.items():
            if key not in ("it_per_s", "images_per_s", "s_per_kimg", "time", "peak_memory_mb"):
                assert b_by_step[m["step"]][key] == value, (m["step"], key)


@pytest.fixture(scope="module")
def ctm_resume(tmp_path_factory, cli):
    ws = tmp_path_factory.mktemp("resume-ctm")
    _, first = _distill_both(cli, ws, "toy2d-ctm", CTM_RESUME, RESUME_N)
    assert "resuming" not in first.stdout
    # As if B had crashed after logging step 30 but before its next checkpoint: a stale line to drop.
    with open(ws / "B" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"loss": 123.0, "step": RESUME_N // 2 + 10}) + "\n")
    second = _distill(cli, ws, "B", "toy2d-ctm", CTM_RESUME + [f"training.iterations={RESUME_N}"])
    return ws, second


@pytest.mark.slow
def test_resume_is_exact(ctm_resume):
    ws, second = ctm_resume
    assert f"resuming B from step {RESUME_N // 2}" in second.stdout.replace(str(ws) + "/", "")
    assert_same_checkpoint(ws / "A", ws / "B", RESUME_N)
    assert_same_logs(ws / "A", ws / "B")
    assert [m["step"] for m in read_metrics(ws / "B")] == [10, 20, 30, 40]
    assert all(m["loss"] != 123.0 for m in read_metrics(ws / "B")), "stale log line survived the resume"


@pytest.mark.slow
def test_config_change_is_refused_and_run_untouched(ctm_resume, cli):
    ws, _ = ctm_resume
    before = cli.snapshot(ws / "B")
    result = cli(["distill", "--preset", "toy2d-ctm", "--out", "B",
                  *_sets(CTM_RESUME + [f"training.iterations={RESUME_N}", "training.lr=5e-4"])], ws)
    line = cli.user_error(result, "training.lr")
    assert "training.iterations" not in line, "iterations may change on resume"
    assert cli.snapshot(ws / "B") == before


@pytest.mark.slow
def test_resume_with_analytic_precond_reuses_the_statistics(tmp_path, cli):
    n = 20
    tiny = ["precond.statistics.n_points=16", "precond.statistics.n_samples=64", "precond.statistics.batch_size=64",
            "eval.n_samples=64", "eval.teacher_steps=8", "training.eval_every=5", "training.log_every=5",
            "training.lr_schedule=constant"]          # extended from n/2 to n iterations (see CTM_RESUME)
    _, first = _distill_both(cli, tmp_path, "toy2d", tiny, n)
    assert "Analytic-Precond statistics: computed (16 levels)" in first.stdout
    stats_file = tmp_path / "B" / "precond_stats.safetensors"
    stats_before = cli.snapshot(stats_file.parent)["precond_stats.safetensors"]
    second = _distill(cli, tmp_path, "B", "toy2d", tiny + [f"training.iterations={n}"])
    assert "resuming" in second.stdout
    assert "Analytic-Precond statistics: cache (16 levels)" in second.stdout
    assert cli.snapshot(stats_file.parent)["precond_stats.safetensors"] == stats_before
    assert_same_checkpoint(tmp_path / "A", tmp_path / "B", n)
    assert_same_logs(tmp_path / "A", tmp_path / "B")
    assert [m["step"] for m in read_metrics(tmp_path / "B") if "align_nfe2" in m] == [0, 5, 10, 15, 20]


# ------------------------------------------------------------------------------------------------
# d. The CD objective with CM preconditioning.


@pytest.mark.slow
def test_toy2d_cd_trains_and_evaluates(tmp_path, cli):
    result = _distill(cli, tmp_path, "cd", "toy2d-cd", ["training.iterations=30", "training.eval_every=0",
                                                        "training.log_every=10"])
    assert "Analytic-Precond" not in result.stdout, "CM preconditioning needs no statistics"
    assert not (tmp_path / "cd" / "precond_stats.safetensors").exists()
    losses = [m["loss"] for m in read_metrics(tmp_path / "cd")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    report = json.loads(cli.ok(cli(["eval", "--ckpt", "cd", "--nfe", "1,2", "--n", "64", "--teacher-steps", "16",
                                    "--json"], tmp_path)).stdout)
    assert report["objective"] == "cd" and report["precond"] == "cm" and report["step"] == 30
    for nfe in (1, 2):
        assert 0 < report["results"][f"nfe={nfe}"]["alignment_rms"] < 10
        assert 0 <= report["results"][f"nfe={nfe}"]["beyond_3sigma"] <= 1
    assert set(report["beyond_3sigma"]) == {"teacher_ode", "exact"}
    # The table: a beyond-3σ column for the mixture teacher, the teacher's and exact samples' fractions under it.
    table = cli.ok(cli(["eval", "--ckpt", "cd", "--nfe", "2", "--n", "64", "--teacher-steps", "16"], tmp_path)).stdout
    words = " ".join(table.split())       # the caption wraps on a narrow terminal
    assert "beyond 3σ" in words and "exact samples" in words, table


# ------------------------------------------------------------------------------------------------
# e. The CPU image preset: SongUNet student, image sampling, image grid png.

DIGITS_TINY = ["training.iterations=4", "training.eval_every=2", "training.log_every=2",
               "precond.statistics.n_points=8", "precond.statistics.n_samples=32", "precond.statistics.batch_size=32",
               "eval.n_samples=16", "eval.teacher_steps=16"]


@pytest.mark.slow
def test_digits_img_end_to_end(tmp_path, cli):
    result = _distill(cli, tmp_path, "img", "digits-img", DIGITS_TINY)
    run = tmp_path / "img"
    assert "Analytic-Precond statistics: computed (8 levels)" in result.stdout
    assert_png(run / "samples.png")
    _, meta = checkpoint_tensors(run, 4)
    kwargs = meta["student"]["init_kwargs"]
    assert meta["student"]["kind"] == "unet" and kwargs["model_type"] == "SongUNet"
    assert (kwargs["img_channels"], kwargs["img_resolution"], kwargs["label_dim"]) == (1, 16, 10)
    assert [m["step"] for m in read_metrics(run) if "align_nfe2" in m] == [0, 2, 4]

    sample, evaluation, plot = cli.parallel([
        (["sample", "--ckpt", "img", "--nfe", "2", "--n", "12", "--label", "7", "--out", "out/s.npz"], tmp_path),
        (["eval", "--ckpt", "img", "--nfe", "1,2", "--json"], tmp_path),
        (["precond", "plot", "img/precond_stats.safetensors", "-o", "fig.png"], tmp_path),
    ])
    cli.ok(sample)
    data = np.load(tmp_path / "out" / "s.npz")
    assert data["samples"].shape == (12, 1, 16, 16) and np.isfinite(data["samples"]).all()
    assert data["labels"].tolist() == [7] * 12
    assert_png(tmp_path / "out" / "s.png")

    report = json.loads(cli.ok(evaluation).stdout)
    assert report["n"] == 16 and report["step"] == 4
    logged = [m for m in read_metrics(run) if "align_nfe2" in m][-1]
    assert report["results"]["nfe=2"]["alignment_rms"] == pytest.approx(logged["align_nfe2"], rel=0.01)

    cli.ok(plot)
    assert_png(tmp_path / "fig.png")


# ------------------------------------------------------------------------------------------------
# f. Mixed precision on the CPU (autocast; GradScaler for fp16).


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("preset, extra", [
    ("toy2d-ctm", ["training.eval_every=0"]),
    # CPU fp16 convolutions are slow: a batch of 4 and no statistics (CTM precond) keep this to seconds.
    ("digits-img", ["training.eval_every=0", "training.batch_size=4", 'precond.kind="ctm"']),
])
def test_mixed_precision_on_cpu(tmp_path, cli, precision, preset, extra):
    _distill(cli, tmp_path, "run", preset, extra + ["training.iterations=2", "training.log_every=1",
                                                      f"training.precision={precision}"])
    metrics = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics), metrics
    tensors, meta = checkpoint_tensors(tmp_path / "run", 2)
    assert meta["config"]["training"]["precision"] == precision
    assert all(bool(t.isfinite().all()) for k, t in tensors.items() if k.startswith(("student.", "ema.")))


# ------------------------------------------------------------------------------------------------
# a. toy2d: distill, then sample / eval / precond on the run directory.

@pytest.fixture(scope="module")
def toy_run(_toy_run_in_background, cli):
    """(workspace, run directory, CompletedProcess) of the toy2d distillation, once it has finished."""
    ws, background = _toy_run_in_background
    return ws, ws / "run", cli.ok(background.result())


@pytest.mark.slow
def test_toy2d_distill_learns(toy_run):
    ws, run, result = toy_run
    assert "run directory" in result.stdout and "Analytic-Precond statistics: computed" in result.stdout
    for name in ("config.toml", "metrics.jsonl", "precond_stats.safetensors"):
        assert (run / name).is_file(), name
    assert_png(run / "samples.png")
    assert (run / "checkpoints" / f"ckpt-{TOY_ITERATIONS:07d}.json").is_file()
    assert (run / "checkpoints" / f"ckpt-{TOY_ITERATIONS:07d}.safetensors").is_file()

    metrics = read_metrics(run)
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)), "metrics.jsonl must have increasing, unique steps"
    aligned = [m for m in metrics if "align_nfe2" in m]
    assert aligned[0]["step"] == 0
    assert [m["step"] for m in aligned] == list(range(0, TOY_ITERATIONS + 1, TOY_EVAL_EVERY))
    first, last = aligned[0]["align_nfe2"], aligned[-1]["align_nfe2"]
    assert last * 5 <= first, f"2-step alignment only went {first:.4f} → {last:.4f} ({first / last:.2f}×)"
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


@pytest.mark.slow
def test_toy2d_sample(toy_run, cli):
    ws, run, _ = toy_run
    cli.ok(cli(["sample", "--ckpt", "run", "--nfe", "2", "--n", "16", "--out", "s.npz"], ws))
    data = np.load(ws / "s.npz")
    assert data["samples"].shape == (16, 2)
    assert np.isfinite(data["samples"]).all()
    sigmas = data["sigmas"]
    assert len(sigmas) == 3 and sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    assert data["labels"].tolist() == [-1] * 16          # unconditional: every sample's class is −1
    assert_png(ws / "s.png")
    # The ring of the toy2d teacher: radius 0.7 around (0.3, -0.2).
    radius = np.linalg.norm(data["samples"] - np.array([0.3, -0.2]), axis=1)
    assert 0.5 < np.median(radius) < 0.9, radius


@pytest.mark.slow
def test_toy2d_eval_json_matches_the_training_log(toy_run, cli):
    ws, run, _ = toy_run
    result = cli.ok(cli(["eval", "--ckpt", "run", "--nfe", "1,2", "--json"], ws))
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["step"] == TOY_ITERATIONS
    assert report["precond"] == "analytic" and report["objective"] == "ctm"
    assert report["n"] == 512 and report["teacher_steps"] == 128
    assert set(report["results"]) == {"nfe=1", "nfe=2"}
    # Exact samples of the ring: ≈ exp(−9/2) = 1.1% beyond 3σ (512 samples: ±0.5%); an untrained student
    # puts over 90% of its samples off the modes.
    assert report["beyond_3sigma"]["exact"] < 0.03
    assert report["results"]["nfe=2"]["beyond_3sigma"] < 0.5
    logged = [m for m in read_metrics(run) if "align_nfe2" in m][-1]
    for nfe in (1, 2):
        assert report["results"][f"nfe={nfe}"]["alignment_rms"] == pytest.approx(logged[f"align_nfe{nfe}"], rel=0.01)
        assert len(report["results"][f"nfe={nfe}"]["sigmas"]) == nfe + 1
        assert math.isfinite(report["results"][f"nfe={nfe}"]["sliced_w2"])


@pytest.mark.slow
def test_toy2d_precond_inspect_plot_compute(toy_run, cli):
    from apctl.preconditioning.statistics import load_statistics

    ws, run, _ = toy_run
    inspect, plot, compute = cli.parallel([
        (["precond", "inspect", "run/precond_stats.safetensors"], ws),
        (["precond", "plot", "run/precond_stats.safetensors", "-o", "fig.png"], ws),
        (["precond", "compute", "--preset", "toy2d", "--set", "precond.statistics.n_samples=256",
          "-o", "stats.safetensors"], ws),
    ])
    cli.ok(inspect)
    run_stats = load_statistics(run / "precond_stats.safetensors")
    assert run_stats.teacher_fingerprint in inspect.stdout
    # the run's own grid (toy2d distils on N = 26), read from the config.toml beside the statistics
    assert "120 λ-levels" in inspect.stdout and "N = 26" in inspect.stdout and "run/config.toml" in inspect.stdout

    cli.ok(plot)
    assert_png(ws / "fig.png")

    cli.ok(compute)
    stats = load_statistics(ws / "stats.safetensors")
    assert stats.teacher_fingerprint == run_stats.teacher_fingerprint, "same preset, same teacher"
    assert len(stats.lam) == 120 and stats.settings["n_samples"] == 256
    assert stats.sigma.max() == pytest.approx(80.0) and stats.sigma.min() == pytest.approx(0.002)
    assert np.all((stats.l >= 0) & (stats.l <= 1)) and np.isfinite(stats.s).all()
    # A quarter of the samples: the same curves, roughly.
    assert np.abs(stats.l - run_stats.l).max() < 0.1
