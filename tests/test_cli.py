"""The command line: help for every command, a fast torch-free `--help`, and one-line errors.

Every bad-input case runs the real entry point (`python -m apctl.cli.main`, whose `main()` turns an
`ApctlError` into one red line on stderr and exit 1) in a workspace holding a real run directory,
an apctl teacher, a statistics-like file and a few decoys, and proves that nothing in that
workspace was modified or created. `--help` checks use typer's CliRunner (fast, in-process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from apctl.cli.main import app

# ------------------------------------------------------------------------------------------------
# --help

HELP = {
    (): ["distill", "sample", "eval", "precond", "teacher"],
    ("distill",): ["--preset", "--set", "--out", "--teacher", "--data", "--dry-run", "--threads"],
    ("sample",): ["--ckpt", "--out", "--nfe", "--sigmas", "--n", "--seed", "--gamma", "--label", "--weights",
                  "--teacher-steps", "--device", "--sigma-schedule", "--threads"],
    ("eval",): ["--ckpt", "--nfe", "--n", "--teacher-steps", "--gamma", "--weights", "--json", "--device",
                "--sigma-schedule", "--sigmas", "--threads", "--fid", "--teacher-row", "--edm-steps", "--batch", "--cache", "--chunk", "ref", "curve", "level"],
    ("eval", "ref"): ["--out", "--data", "--preset", "--set", "--batch", "--kid-images", "--inception-weights", "--device"],
    ("eval", "curve"): ["RUN", "--metric", "--nfe", "--fid", "--n", "--target", "--out", "--gamma", "--batch",
                        "--inception-weights", "--device"],
    ("eval", "level"): ["--ckpt", "--n", "--seed", "--teacher-steps", "--min-level", "--max-level", "--by", "--gamma",
                        "--weights", "--fid", "--batch", "--inception-weights", "--json", "--device", "--threads"],
    ("precond",): ["compute", "plot", "inspect"],
    ("precond", "compute"): ["--out", "--preset", "--set", "--teacher", "--data", "--force", "--device", "--threads"],
    ("precond", "plot"): ["STATS", "--out", "--grid", "--form"],
    ("precond", "inspect"): ["STATS", "--grid", "--form", "--json", "--csv"],
    ("teacher",): ["train", "import"],
    ("teacher", "train"): ["--preset", "--out", "--set", "--data", "--dry-run", "--threads"],
    ("teacher", "import"): ["FILE", "--out", "--force"],
}


def _command_paths(cmd, prefix=()):
    yield prefix
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _command_paths(sub, prefix + (name,))


def test_help_table_covers_every_command():
    assert set(_command_paths(typer.main.get_command(app))) == set(HELP)


@pytest.mark.parametrize("path", sorted(HELP), ids=lambda p: " ".join(p) or "apctl")
def test_help(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    for word in HELP[path]:
        assert word in result.output, f"{word!r} missing from `apctl {' '.join(path)} --help`:\n{result.output}"
    # an option's value is named for what it is (N, γ, PATH), not by click's type ("<int range>")
    assert "range>" not in result.output, result.output


def test_no_arguments_shows_help():
    result = CliRunner().invoke(app, [])
    assert "distill" in result.output and "Usage" in result.output


def test_help_imports_no_torch(tmp_path, cli):
    # The real guard: importing the CLI, and answering every --help through main(), loads no torch.
    probe = subprocess.run([sys.executable, "-c", "import apctl.cli.main, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=cli.env(), cwd=tmp_path)
    assert probe.stdout.strip() == "False", probe.stdout + probe.stderr
    script = (
        "import sys, json\n"
        "from apctl.cli.main import main\n"
        f"for args in {[list(p) for p in HELP]!r}:\n"
        "    sys.argv = ['apctl', *args, '--help']\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (args, exc.code)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'numpy', 'scipy', 'matplotlib') if m in sys.modules)),"
        " file=sys.stderr)\n"
    )
    every = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli.env(), cwd=tmp_path)
    assert every.returncode == 0, every.stderr
    heavy = json.loads(every.stderr.strip().splitlines()[-1])
    assert "torch" not in heavy, f"--help imported {heavy}"
    # No wall-clock assertion here: timings belong in bench/ (a loaded CI machine would make it flaky);
    # what keeps --help fast is that it loads no torch, asserted above.
    result = cli.ok(cli(["--help"], tmp_path))
    assert "distill" in result.stdout


def test_module_entry_point_and_exit_codes(tmp_path, cli):
    """`python -m apctl.cli.main` is the real CLI: ApctlError → exit 1, one 'error:' line."""
    line = cli.user_error(cli(["distill", "--preset", "no-such-preset"], tmp_path), "unknown preset 'no-such-preset'")
    assert line.startswith("error:")
    assert cli(["distill", "--preset", "no-such-preset"], tmp_path).returncode == 1
    assert not any(tmp_path.iterdir())


def test_teacher_and_data_shorthands_keep_the_path_verbatim():
    """--teacher/--data become teacher.file/data.path: the given path made absolute, every character kept
    (backslashes of a Windows-style name, both kinds of quotes, spaces, non-ASCII)."""
    from apctl.cli.options import resolve_config

    for raw in (r"C:\models\edm-cifar10-32x32-cond-vp.pkl", "it's here.pkl", "both'\"quotes.pkl", "plain/σ x.pkl",
                "/abs/edm.pkl"):
        expected = str(Path(raw).expanduser().absolute())
        cfg, _ = resolve_config("cifar10-cond", [], Path(raw), Path(raw))
        assert cfg.teacher.file == expected, (raw, cfg.teacher.file)
        assert cfg.data.path == expected, (raw, cfg.data.path)
        assert cfg.teacher.kind == "network"


# ------------------------------------------------------------------------------------------------
# Bad input: non-zero exit, one line on stderr, no traceback, nothing in the workspace touched.


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cli):
    """A real (two-iteration) toy2d-ctm run, an apctl teacher, decoys; built once through the CLI."""
    ws = tmp_path_factory.mktemp("cli-ws")
    cli.ok(cli(["distill", "--preset", "toy2d-ctm", "--out", "run", "--set", "training.iterations=2",
                "--set", "training.eval_every=0"], ws))
    assert (ws / "run" / "checkpoints" / "ckpt-0000002.json").is_file()

    from apctl.networks import EDM_PRESET_KWARGS, build_preset
    from apctl.teachers.apctl_format import save_teacher
    from apctl.teachers.bundle import TeacherBundle

    name = "tiny-songunet-16-uncond"
    bundle = TeacherBundle(build_preset(name), {"class_name": "EDMPrecond", "init_kwargs": EDM_PRESET_KWARGS[name]},
                           "apctl", "")
    save_teacher(bundle, ws / "teacher.safetensors")
    (ws / "random.json").write_text(json.dumps({"hello": "world", "step": 3}))
    (ws / "x.txt").write_text("keep me\n")
    (ws / "existing.safetensors").write_bytes(b"precious bytes, not to be overwritten")
    (ws / "garbage.pkl").write_bytes(bytes(range(256)) * 8)
    return ws


CKPT = "run/checkpoints/ckpt-0000002"

BAD_INPUT = [
    # id, argv, fragments the one error line must contain
    ("eval-missing-ckpt", ["eval", "--ckpt", "no-such-run"], ["no-such-run"]),
    ("sample-missing-ckpt", ["sample", "--ckpt", "no-such-run/ckpt-0000009.json", "--out", "s.npz"],
     ["ckpt-0000009"]),
    ("eval-dir-without-checkpoint", ["eval", "--ckpt", "."], ["no checkpoint"]),
    ("distill-unknown-preset", ["distill", "--preset", "no-such-preset", "--out", "new-run"],
     ["unknown preset 'no-such-preset'"]),
    ("compute-unknown-preset", ["precond", "compute", "--preset", "no-such-preset", "-o", "new.safetensors"],
     ["unknown preset 'no-such-preset'"]),
    ("distill-set-unknown-key", ["distill", "--out", "new-run", "--set", "training.lrr=1e-3"],
     ["--set training.lrr=1e-3", "training.lrr"]),
    ("distill-set-bad-value", ["distill", "--out", "new-run", "--set", "training.lr=abc"],
     ["--set training.lr=abc", "training.lr"]),
    ("distill-set-no-equals", ["distill", "--out", "new-run", "--set", "training.lr"], ["--set"]),
    ("compute-set-bad-value", ["precond", "compute", "-o", "new.safetensors", "--set", "precond.statistics.n_samples=-3"],
     ["precond.statistics.n_samples"]),
    ("eval-teacher-safetensors", ["eval", "--ckpt", "teacher.safetensors"], ["teacher"]),
    ("eval-teacher-json", ["eval", "--ckpt", "teacher.json"], ["teacher"]),
    ("sample-teacher-safetensors", ["sample", "--ckpt", "teacher.safetensors", "--out", "s.npz"], ["teacher"]),
    ("eval-random-json", ["eval", "--ckpt", "random.json"], ["random.json", "not an apctl student checkpoint"]),
    ("sample-random-json", ["sample", "--ckpt", "random.json", "--out", "s.npz"], ["random.json"]),
    ("eval-metrics-as-ckpt", ["eval", "--ckpt", "run/metrics.jsonl"], ["metrics.jsonl"]),
    ("eval-without-ckpt", ["eval", "--nfe", "1"], ["--ckpt"]),
    ("eval-nfe-0", ["eval", "--ckpt", "run", "--nfe", "0"], ["--nfe"]),
    ("eval-nfe-abc", ["eval", "--ckpt", "run", "--nfe", "abc"], ["--nfe"]),
    ("eval-nfe-negative-in-list", ["eval", "--ckpt", "run", "--nfe", "1,-2"], ["--nfe"]),
    ("sample-nfe-0", ["sample", "--ckpt", "run", "--nfe", "0", "--out", "s.npz"], ["at least 1"]),
    ("sample-nfe-abc", ["sample", "--ckpt", "run", "--nfe", "abc", "--out", "s.npz"], ["--nfe"]),
    ("sample-sigmas-increasing", ["sample", "--ckpt", "run", "--sigmas", "1,2", "--out", "s.npz"], ["decrease"]),
    ("sample-sigmas-not-numbers", ["sample", "--ckpt", "run", "--sigmas", "80,abc", "--out", "s.npz"], ["--sigmas"]),
    ("sample-sigmas-negative", ["sample", "--ckpt", "run", "--sigmas", "80,-1", "--out", "s.npz"], ["positive"]),
    ("eval-sigmas-increasing", ["eval", "--ckpt", "run", "--sigmas", "1,2"], ["decrease"]),
    ("eval-sigmas-not-numbers", ["eval", "--ckpt", "run", "--sigmas", "80,abc"], ["--sigmas"]),
    ("eval-sigmas-one-level", ["eval", "--ckpt", "run", "--sigmas", "80"], ["at least two levels"]),
    ("sample-out-txt", ["sample", "--ckpt", "run", "--out", "x.txt"], ["--out", ".npz"]),
    ("sample-n-0", ["sample", "--ckpt", "run", "--n", "0", "--out", "s.npz"], ["--n"]),
    ("sample-label-unconditional", ["sample", "--ckpt", "run", "--label", "3", "--out", "s.npz"], ["unconditional"]),
    ("sample-gamma-out-of-range", ["sample", "--ckpt", "run", "--gamma", "2", "--out", "s.npz"], ["gamma"]),
    ("eval-n-1", ["eval", "--ckpt", "run", "--n", "1"], ["--n"]),
    ("eval-weights", ["eval", "--ckpt", "run", "--weights", "best"], ["--weights"]),
    ("eval-teacher-steps-1", ["eval", "--ckpt", "run", "--teacher-steps", "1"], ["--teacher-steps"]),
    ("plot-missing-file", ["precond", "plot", "missing.safetensors", "-o", "fig.png"], ["missing.safetensors"]),
    ("plot-not-statistics", ["precond", "plot", f"{CKPT}.safetensors", "-o", "fig.png"],
     ["not an apctl precond statistics file"]),
    ("plot-not-safetensors", ["precond", "plot", "run/metrics.jsonl", "-o", "fig.png"], ["metrics.jsonl"]),
    ("plot-bad-suffix", ["precond", "plot", f"{CKPT}.safetensors", "-o", "fig.gif"], ["--out"]),
    ("inspect-not-statistics", ["precond", "inspect", "teacher.safetensors"], ["not an apctl precond statistics file"]),
    ("inspect-missing-file", ["precond", "inspect", "missing.safetensors"], ["missing.safetensors"]),
    ("compute-existing-output", ["precond", "compute", "-o", "existing.safetensors"],
     ["existing.safetensors", "--force"]),
    ("compute-bad-suffix", ["precond", "compute", "-o", "stats.npz"], ["--out"]),
    ("teacher-import-garbage", ["teacher", "import", "garbage.pkl", "-o", "imported.safetensors"], ["garbage.pkl"]),
    ("teacher-import-missing", ["teacher", "import", "missing.pkl", "-o", "imported.safetensors"], ["missing.pkl"]),
    ("teacher-import-existing-output", ["teacher", "import", "teacher.safetensors", "-o", "teacher.safetensors"],
     ["--force"]),
    ("teacher-import-json-as-input", ["teacher", "import", "random.json", "-o", "imported.safetensors"],
     ["random.json"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_touches_nothing(workspace, cli, argv, fragments):
    before = cli.snapshot(workspace)
    result = cli(argv, workspace)
    cli.user_error(result, *fragments)
    assert cli.snapshot(workspace) == before, "the failed command modified or created files\n" + cli.describe(result)
