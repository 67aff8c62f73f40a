"""The benchmark scripts in bench/: the speed-up arithmetic of bench/acceleration.py (and its use in
bench/acceleration_network.py) on synthetic curves, the commands bench/cifar10_figure3.py runs, and short
runs of bench/toy2d_ceiling.py, bench/toy2d_exact_goal.py (whose goal chain is checked against a closed form),
bench/toy2d_teacher_start.py, bench/toy2d_teacher_grid.py, bench/objective_cost.py and bench/isd_guidance.py,
bench/toy2d_default.py's time reference (toy2d as issue 9 found it), and bench/toy2d_two_step_level.py."""

from __future__ import annotations

import importlib.util
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def json_rows(script: str, *args: str) -> list[dict]:
    """Run bench/<script> single-threaded in a subprocess; the JSON rows it prints (other lines skipped)."""
    import json
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BENCH.parent))
    out = subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# A distillation of 3 iterations with cheap statistics and probe: the scripts that run `apctl distill` end to end.
TINY_DISTILL = ("--n", "256", "--set", "training.iterations=3", "--set", "precond.statistics.n_samples=256",
                "--set", "eval.n_samples=64")


acceleration = load("acceleration")
STEPS = list(range(0, 101, 10))
BASELINE = [1.0 - 0.005 * s for s in STEPS]            # reaches its final 0.5 at step 100
FAST = [max(1.0 - 0.01 * s, 0.5) for s in STEPS]      # reaches 0.5 at step 50


def test_speedup_half_the_iterations_is_2x():
    r = acceleration.speedup(STEPS, BASELINE, FAST)
    assert (r["target"], r["baseline_steps"], r["candidate_steps"]) == (0.5, 100, 50)
    assert r["ratio"] == pytest.approx(2.0)


def test_speedup_never_reached_is_none_and_slower_is_below_1():
    assert acceleration.speedup(STEPS, BASELINE, [0.9] * len(STEPS))["ratio"] is None
    assert acceleration.speedup(STEPS, FAST, BASELINE)["ratio"] == pytest.approx(0.5)
    assert acceleration.format_ratio(None) == "never reached"


def test_speedup_at_step_0():
    assert math.isinf(acceleration.speedup(STEPS, BASELINE, [0.1] * len(STEPS))["ratio"])
    assert acceleration.speedup(STEPS, [0.5] * len(STEPS), [0.4] * len(STEPS))["ratio"] == 1.0


def test_baseline_is_credited_with_its_first_reach():
    # A baseline that dips to its final value at step 60, then wobbles: its steps are 60, not 100.
    wobbly = [1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.52, 0.51, 0.52, 0.5]
    r = acceleration.speedup(STEPS, wobbly, FAST)
    assert (r["baseline_steps"], r["candidate_steps"], r["ratio"]) == (60, 50, pytest.approx(1.2))


def test_summarise_seed_mean_and_per_seed():
    def run(kind, seed, nfe2):
        return {"preset": "p", "kind": kind, "seed": seed, "curve": [(s, v + 1, v) for s, v in zip(STEPS, nfe2)]}

    slow = [v + 0.1 for v in FAST]   # seed 1's AP: reaches 0.6 (not the baseline's 0.5) → never
    results = [run("ctm", 0, BASELINE), run("analytic", 0, FAST), run("ctm", 1, BASELINE), run("analytic", 1, slow)]
    s = acceleration.summarise(results, "p")
    assert s["nfe2"]["speedup_per_seed"] == [pytest.approx(2.0), None]
    # the seed-mean AP curve bottoms out at 0.55 > 0.5: never reached on the mean either
    assert s["nfe2"]["speedup"] is None
    assert s["nfe2"]["final_ctm"] == (pytest.approx(0.5), pytest.approx(0.0))
    assert s["nfe2"]["final_analytic"] == (pytest.approx(0.55), pytest.approx(0.05))


def test_network_summary_pairs_and_ratios():
    net = load("acceleration_network")
    fid = {"fid_real_nfe1": 10.0, "fid_teacher_nfe1": 5.0, "fid_real_nfe2": 8.0, "fid_teacher_nfe2": 4.0,
           "fid_seconds_nfe1": 1.0, "fid_seconds_nfe2": 1.0}

    def run(objective, kind, seed, curve):
        return {"objective": objective, "kind": kind, "seed": seed, "final_fid": fid,
                "curve": [{"step": s, "nfe1": v, "nfe2": v, "nfe4": v} for s, v in zip(STEPS, curve)]}

    results = [run("ctm", "ctm", s, BASELINE) for s in (0, 1)] + [run("ctm", "analytic", s, FAST) for s in (0, 1)]
    s = net.summarise_pair(results, "ctm")
    assert s["speedup"]["nfe2"]["ratio"] == pytest.approx(2.0)
    assert s["speedup"]["nfe1"]["per_seed"] == [pytest.approx(2.0)] * 2
    assert s["variants"]["analytic"]["nfe4"]["final"] == (pytest.approx(0.5), 0.0)
    assert s["variants"]["ctm"]["fid"]["fid_real_nfe2"] == (8.0, 0.0)
    assert "fid_seconds_nfe1" not in s["variants"]["ctm"]["fid"]


def test_cifar10_figure3_dry_run_commands(tmp_path):
    out = tmp_path / "fig3"
    done = subprocess.run(
        [sys.executable, str(BENCH / "cifar10_figure3.py"), "--dry-run", "--teacher", "T.pkl", "--data", "D.tar.gz",
         "--ref", "REF.npz", "--gpus", "4", "--iterations", "12000", "--fid-every", "5000", "--fid-n", "5000",
         "--out", str(out), "--set", "training.lr=2e-4"],
        capture_output=True, text=True, check=True, cwd=BENCH.parent, timeout=120)
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
    train = [c for c in commands if c[0] == "torchrun"]
    evals = [c for c in commands if "eval" in c]
    assert len(train) == 2 and len(evals) == 6 and len(commands) == 8
    assert not out.exists()                                 # nothing ran
    for cmd, kind in zip(train, ("analytic", "ctm")):
        assert cmd[1:9] == ["--nproc_per_node=4", "-m", "apctl.cli.main", "distill", "--preset", "cifar10-cond",
                            "--teacher", "T.pkl"]
        assert cmd[cmd.index("--data") + 1] == "D.tar.gz"
        assert cmd[cmd.index("--out") + 1] == str(out / kind)
        sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        # checkpoints every K, and all of them kept (5000, 10000, 12000 → at least 3)
        assert f'precond.kind="{kind}"' in sets and "training.checkpoint_every=5000" in sets
        assert "training.iterations=12000" in sets and "training.lr=2e-4" in sets
        keep = int(next(s for s in sets if s.startswith("training.keep_checkpoints=")).split("=")[1])
        assert keep >= 3
    expected = [(kind, step) for kind in ("analytic", "ctm") for step in (5000, 10000, 12000)]
    for cmd, (kind, step) in zip(evals, expected):
        assert cmd[1:4] == ["-m", "apctl.cli.main", "eval"]
        assert cmd[cmd.index("--ckpt") + 1] == str(out / kind / "checkpoints" / f"ckpt-{step:07d}.json")
        assert cmd[cmd.index("--fid") + 1] == "REF.npz"
        assert cmd[cmd.index("--nfe") + 1] == "1,2" and cmd[cmd.index("--n") + 1] == "5000"
        assert "--json" in cmd


def test_cifar10_checkpoint_steps():
    fig3 = load("cifar10_figure3")
    assert fig3.checkpoint_steps(150000, 5000)[-1] == 150000 and len(fig3.checkpoint_steps(150000, 5000)) == 30
    assert fig3.checkpoint_steps(12000, 5000) == [5000, 10000, 12000]


def test_toy2d_ceiling_runs_and_scores_on_the_probe():
    """bench/toy2d_ceiling.py end to end at 3 iterations: one JSON row; its regression targets (a 48-step Heun
    chain) sit within 0.01 RMS of the probe's 256-step reference, and an untrained regression is far from it.
    `--set` reaches the preset it reads (the optimizer built, its β, the batch)."""
    row = json_rows("toy2d_ceiling.py", "--iterations", "3", "--fourier", "8", "--input-gain", "2.5",
                    "--set", 'training.optimizer="radam"', "--set", "training.betas=[0.8, 0.9]", "--set", "training.batch_size=64")[-1]
    assert row["iterations"] == 3 and row["fourier"] == 8 and row["batch"] == 64 and row["input_gain"] == 2.5
    assert row["optimizer"] == "RAdam" and row["betas"] == [0.8, 0.9]
    assert row["targets_vs_reference"]["alignment_rms"] < 0.01
    assert row["regression"]["alignment_rms"] > 10 * row["targets_vs_reference"]["alignment_rms"]
    assert 0 < row["teacher_ode_beyond_3sigma"]["exact"] < 0.05


def test_toy2d_teacher_start_student_is_the_teacher_at_the_start_and_runs():
    """bench/toy2d_teacher_start.py: a fresh teacher-plus-correction student is the exact teacher's denoiser
    for every target time s (its MLP's last layer is zero) and moves away once its MLP does; end to end at
    3 iterations it gives one JSON row scored on the probe."""
    import torch

    from apctl.networks.mlp import TwoTimeMLP
    from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher

    bench = load("toy2d_teacher_start")
    teacher = GaussianMixtureTeacher([[1.0, -0.2], [-0.4, 0.3]], [0.08, 0.1])
    net = bench.TeacherPlusCorrection(TwoTimeMLP((2,), hidden=16, depth=2, embed_dim=8, input_gain=100), teacher)
    x = 3 * torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([80.0, 5.0, 1.0, 0.3, 0.01])
    for s in (t, torch.full_like(t, 0.002), t / 2):
        assert torch.allclose(net(x, t, s), teacher(x, t).float(), rtol=0, atol=1e-6)
    torch.nn.init.normal_(net.mlp.head.weight)
    assert not torch.allclose(net(x, t, t), teacher(x, t).float(), rtol=0, atol=1e-3)
    assert net.output_weight() is net.mlp.head.weight

    row = json_rows("toy2d_teacher_start.py", *TINY_DISTILL)[-1]
    assert row["student"] == "teacher + correction" and row["step"] == 3
    assert row["rms2"] > 0.1 and 0 < row["beyond_exact"] < 0.05


def test_toy2d_teacher_grid_rows_converge_to_the_probe_reference():
    """bench/toy2d_teacher_grid.py: one row per level count, 2(N − 1) evaluations; the chain on the
    reference's own 257 levels is the reference (RMS 0, the same fraction beyond 3σ), and fewer levels
    are further from it."""
    rows = {r["levels"]: r for r in json_rows("toy2d_teacher_grid.py", "--levels", "18", "26", "257", "--n", "512")}
    assert sorted(rows) == [18, 26, 257] and rows[18]["nfe"] == 34 and rows[18]["reference_levels"] == 257
    assert rows[257]["alignment_rms"] == 0 and rows[257]["beyond_3sigma"] == rows[257]["teacher_ode"]
    assert rows[18]["alignment_rms"] > rows[26]["alignment_rms"] > 0


def test_acceleration_fid_table_and_iterations_to_reach():
    """bench/acceleration_fid.py's summary on synthetic rows: seed means in the table, and the step at which
    Analytic-Precond's seed-mean FID first reaches the baseline's final one (CD: 6.0 at step 100 against
    200, 2×; CTM: never)."""
    fid = load("acceleration_fid")
    curves = {"cd-cm": [10.0, 8.0, 6.0], "cd-analytic": [10.0, 6.0, 5.0], "ctm-ctm": [9.0, 7.0, 5.0],
              "ctm-analytic": [9.0, 8.0, 6.0]}
    rows = [{"run": f"{name}-seed{seed}", "step": step, "nfe": 1, "n": 8, "fid_real": value + (seed - 0.5) / 10,
             "fid_teacher": value}
            for name, values in curves.items() for seed in (0, 1) for step, value in zip((0, 100, 200), values)]
    text = fid.markdown(rows)
    assert "| CD | CM's coefficients | 10.00 ± 0.05 / 10.00 ± 0.00 (2 seeds) | 8.00 ± 0.05" in text
    assert "CD, the final FID of CM's coefficients against real digits (6.00, step 200): reached by Analytic-Precond at step 100, 2.00×" in text
    assert "CTM, the final FID of CTM's coefficients against real digits (5.00, step 200): reached by Analytic-Precond never" in text
    assert fid.run_fields("cd-analytic-seed12") == {"run": "cd-analytic-seed12", "objective": "cd", "kind": "analytic", "seed": 12}


def test_toy2d_exact_goal_chain_is_the_gaussian_flow():
    """bench/toy2d_exact_goal.py's goal Φ(x; σ_a → σ_b), for a teacher that is one Gaussian N(μ, v·I), against
    the ODE's closed form x_b = μ + (x − μ)·√((σ_b² + v)/(σ_a² + v)), per row from its own level to its own
    level (a row with a = b keeps its value)."""
    import torch

    from apctl.schedules import karras_sigmas

    exact_goal = load("toy2d_exact_goal").exact_goal
    mu, v = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.08 ** 2
    denoise = lambda x, sigma, _: mu + (v / (sigma[:, None] ** 2 + v)) * (x - mu)   # noqa: E731 (E[x_0 | x_σ])
    fine = torch.as_tensor(karras_sigmas(4 * 25 + 1))
    start, stop = torch.tensor([0, 0, 8, 40, 60, 100]), torch.tensor([100, 40, 72, 41, 60, 100])
    x = fine[start][:, None] * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + mu
    expected = mu + (x - mu) * ((fine[stop] ** 2 + v) / (fine[start] ** 2 + v)).sqrt()[:, None]
    got = exact_goal(denoise, x, fine, start, stop)
    assert torch.allclose(got, expected, rtol=0, atol=1e-3)           # the rows move by 0.4 to 160
    assert torch.equal(got[4:], x[4:])


def test_toy2d_exact_goal_runs_the_preset_with_the_swapped_goal():
    """bench/toy2d_exact_goal.py end to end at 3 iterations: one JSON row scored on the probe."""
    row = json_rows("toy2d_exact_goal.py", *TINY_DISTILL)[-1]
    assert row["objective"] == "ctm, exact goal" and row["step"] == 3 and row["sub"] == 4
    assert row["rms2"] > 0.1 and 0 < row["beyond_exact"] < 0.05


def test_objective_cost_times_each_preset_against_the_first():
    """bench/objective_cost.py at 2 steps: one table row per preset, the reference's own ratio exactly 1."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(BENCH.parent))
    out = subprocess.run([sys.executable, str(BENCH / "objective_cost.py"), "--presets", "toy2d", "digits-ect",
                          "--steps", "2", "--warmup", "1"], env=env, capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| toy2d") or line.startswith("| digits-ect")]
    assert [r[0].strip() for r in rows] == ["toy2d", "digits-ect"]
    assert rows[0][3].strip() == "1.000" and float(rows[1][3]) > 0


def test_isd_guidance_scores_classes_by_the_nearest_mode(tmp_path):
    """bench/isd_guidance.py: a sample on a mode of its class counts, on a mode of another class does not, and
    one 4σ from every mode is beyond 3σ; then a 2-iteration run per w prints one row each."""
    import numpy as np

    bench = load("isd_guidance")
    means = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    classes = np.array([0, 0, 1, 1])
    samples = np.array([[0.01, 0.0], [0.0, 1.0], [0.5, 0.5]])     # mode 0 (class 0), mode 2 (class 1), far away
    np.savez(tmp_path / "s.npz", samples=samples, labels=np.array([0, 0, 1]))
    in_class, beyond = bench.class_shares(tmp_path / "s.npz", means, 0.1, classes)
    assert in_class == 1 / 3 and beyond == 1 / 3       # the far sample is nearest a class-0 mode: not in class 1
    rows = json_rows("isd_guidance.py", "--guidance", "1", "2", "--n", "16", "--set", "training.iterations=2",
                     "--set", "training.eval_every=0")
    assert [r["guidance"] for r in rows] == [1.0, 2.0] and all(0 <= r["in_class"] <= 1 for r in rows)


def test_toy2d_issue_time_reference_is_the_preset_issue_9_was_filed_against():
    """bench/toy2d_default.py --reference times toy2d as issue 9 found it: today's preset with ISSUE_TIME_PRESET
    applied must resolve to presets/toy2d.toml of commit 6f84324 (its values, and the defaults it left unset),
    whatever the shipped preset has moved to since."""
    from apctl.presets import load_config

    cfg, _ = load_config("toy2d", load("toy2d_default").ISSUE_TIME_PRESET)
    s, o, t, st = cfg.student, cfg.objective, cfg.training, cfg.precond.statistics
    assert (s.kind, s.hidden, s.depth, s.embed_dim, s.input_gain, s.activation) == ("mlp", 256, 4, 64, 1.0, "silu")
    assert (o.kind, o.grid_points, o.ctm.max_teacher_steps, o.distance.kind, o.ctm.dsm_weight, o.target_ema) == \
        ("ctm", 18, 17, "l2", 1.0, 0.99)
    assert (t.iterations, t.batch_size, t.lr, t.optimizer, list(t.betas), t.lr_schedule, t.lr_warmup) == \
        (4000, 256, 1e-3, "radam", [0.9, 0.999], "constant", 0)
    assert (t.ema_decay, t.eval_every, t.checkpoint_every, t.precision) == (0.99, 500, 1000, "fp32")
    assert (cfg.precond.kind, cfg.precond.form, st.n_points, st.n_samples) == ("analytic", "backward", 120, 4096)
    assert (cfg.eval.n_samples, cfg.eval.teacher_steps) == (2048, 256)


def test_toy2d_default_reference_row_and_cpu_ratios():
    """--reference: the issue-time run first (marked, with ISSUE_TIME_PRESET's keys, the first seed), then each
    seed's row with its CPU time over the reference's."""
    bench = load("toy2d_default")
    tiny = [a for a in TINY_DISTILL[2:] if a != "--set"]
    reference, row = json_rows("toy2d_default.py", *TINY_DISTILL, "--seeds", "1", "--reference",
                               *[arg for key in tiny for arg in ("--reference-set", key)])
    assert reference["reference"] is True and reference["sets"][:len(bench.ISSUE_TIME_PRESET)] == bench.ISSUE_TIME_PRESET
    assert reference["seed"] == row["seed"] == 1 and "reference" not in row and row["step"] == 3
    assert row["cpu_ratio"] == round(row["cpu_s"] / reference["cpu_s"], 3)


def test_toy2d_two_step_level_rows_reproduce_the_default_bench_at_the_runs_level(tmp_path):
    """bench/toy2d_two_step_level.py on a 3-iteration toy2d run: one row per inner grid level up to --max-level,
    and on the eval probe (seed 12345) the row at the run's named level is bench/toy2d_default.py's 2-step figure
    (an explicit σ list against the run's `[eval.levels]`); toy2d_default's row also carries the default Karras
    level's figures; the summary's means and best level follow from the rows."""
    from apctl.schedules import karras_sigmas

    row = json_rows("toy2d_default.py", *TINY_DISTILL, "--keep", str(tmp_path))[-1]
    grid = karras_sigmas(26).tolist()
    assert row["sigmas2"][1] == min(grid, key=lambda g: abs(math.log(g / 0.0464)))
    assert row["sigmas2_default_levels"][1] == min(grid, key=lambda g: abs(math.log(g / 2.515)))
    assert row["rms2_default_levels"] != row["rms2"]
    rows = json_rows("toy2d_two_step_level.py", str(tmp_path / "toy2d-seed0"), "--probe-seed", "12345", "--n", "256",
                     "--max-level", "1.0")
    levels, summary, best = [r for r in rows if "run" in r], [r for r in rows if r.get("summary")], rows[-1]
    assert [r["level"] for r in levels] == pytest.approx([g for g in grid[1:-1] if g < 1.0])
    at_named = next(r for r in levels if r["level"] == pytest.approx(row["sigmas2"][1]))
    assert at_named["alignment_rms"] == pytest.approx(row["rms2"], rel=1e-6)
    assert at_named["beyond_3sigma"] == pytest.approx(row["beyond_student2"], abs=1e-12)
    assert [s["mean_beyond_3sigma"] for s in summary] == pytest.approx([r["beyond_3sigma"] for r in levels])
    assert best["best_level"] == min(summary, key=lambda s: s["mean_beyond_3sigma"])["level"]
