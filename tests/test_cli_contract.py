"""The command line keeps its word (issue 9, items 1, 5 and 6): the thread policy, an honest `--dry-run`,
strict JSON everywhere, the user guide naming every flag, flags shown as flags, `--out` everywhere,
`precond inspect --json/--csv` in full precision, `labels` in every sample file, `eval --nfe` from the
run's `eval.nfe`, and error messages that name things that exist.

One tiny toy2d-ctm run (2 steps) and one tiny statistics file are made once through the real CLI;
everything else runs in-process.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from apctl.cli.main import app

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "user_guide.md").read_text()
SHIPPED_TEACHER = REPO / "teachers" / "digits-teacher.safetensors"


def _strict_loads(text: str):
    """json.loads that refuses NaN / Infinity / -Infinity, as every other JSON reader does."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def _commands(cmd=None, path=()):
    """(path, click command) of every leaf command."""
    cmd = cmd or typer.main.get_command(app)
    subs = getattr(cmd, "commands", None)
    if not subs:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, path + (name,))


COMMANDS = dict(_commands())


def _flags(cmd) -> list[str]:
    """Every visible option name of a command (long and short), --help excluded."""
    out = []
    for param in cmd.params:
        if param.param_type_name == "option" and not param.hidden:
            out += [o for o in param.opts + param.secondary_opts if o != "--help"]
    return out


def _guide_row(path: tuple[str, ...]) -> str:
    rows = [ln for ln in GUIDE.splitlines() if ln.startswith(f"| `apctl {' '.join(path)} ")]
    assert len(rows) == 1, f"the user guide's command table needs one row for `apctl {' '.join(path)}`"
    return rows[0].split("` |")[0]


# ------------------------------------------------------------------------------------------------
# The user guide and --help


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p))
def test_user_guide_names_every_flag_of_every_command(path):
    row = _guide_row(path)
    for flag in _flags(COMMANDS[path]):
        # a flag is named as a whole word: --n must not be satisfied by --nfe
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", row), f"{flag} of `apctl {' '.join(path)}` missing from the user guide: {row}"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p))
def test_flags_are_shown_as_flags_and_out_is_the_output_flag(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output, result.output
    assert "--output" not in result.output, "--out/-o is the output flag everywhere (--output is a hidden alias)"
    flags = _flags(COMMANDS[path])
    if any(o in flags for o in ("-o",)):
        assert "--out" in flags


def test_output_is_a_hidden_alias_of_out():
    from apctl.errors import ApctlError

    result = CliRunner().invoke(app, ["precond", "compute", "--output", "stats.npz"])
    assert isinstance(result.exception, ApctlError) and "--out must end in .safetensors" in str(result.exception)
    both = CliRunner().invoke(app, ["precond", "plot", "s.safetensors", "--out", "a.png", "--output", "b.png"])
    assert both.exit_code == 2 and "once" in both.output
    neither = CliRunner().invoke(app, ["precond", "plot", "s.safetensors"])
    assert neither.exit_code == 2 and "--out" in neither.output


def test_user_guide_documents_the_environment():
    section = GUIDE.split("## Environment", 1)[1].split("\n## ", 1)[0]
    for name in ("APCTL_TEACHERS", "~/.cache/apctl/teachers", "APCTL_PRESETS", "APCTL_LOG_SECONDS", "APCTL_DATA",
                 "OMP_NUM_THREADS"):
        assert name in section, name
    assert "exit code 1" in GUIDE and "2 for command-line usage errors" in GUIDE


def test_math_notes_cite_only_files_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    names = {Path(f).name for f in tracked}
    text = (REPO / "docs" / "math.md").read_text()
    for cited in set(re.findall(r"[\w./-]+\.(?:py|md|toml|json|txt)\b", text)):
        assert cited in tracked or f"docs/{cited}" in tracked or Path(cited).name in names, cited
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert target.startswith("http") or (REPO / "docs" / target).exists(), target


def test_lpips_error_names_a_setting_that_exists():
    """The missing-trunk message tells the user a --set; that --set must be accepted and reach the config."""
    from apctl.objectives.lpips_weights import TRUNK_FLAG
    from apctl.presets import load_config

    key_value = TRUNK_FLAG.removeprefix("--set ")
    assert TRUNK_FLAG.startswith("--set ") and key_value.endswith("=PATH")
    cfg, _ = load_config("cifar10-cond", [key_value.replace("PATH", "/weights/vgg16-397923af.pth")])
    assert cfg.objective.distance.lpips_trunk == "/weights/vgg16-397923af.pth"


# ------------------------------------------------------------------------------------------------
# Threads


def test_thread_policy_rule(monkeypatch):
    from apctl.threads import SMALL_NETWORK_PARAMETERS, chosen_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert chosen_threads(3, "cpu", 10**9) == 3 and chosen_threads(3, "cuda", 0) == 3   # asked for: always
    assert chosen_threads(0, "cpu", 0) == 1                                             # exact teachers
    assert chosen_threads(0, "cpu", SMALL_NETWORK_PARAMETERS) == 1
    assert chosen_threads(0, "cpu", SMALL_NETWORK_PARAMETERS + 1) is None               # torch's default
    assert chosen_threads(0, "cuda", 1000) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert chosen_threads(0, "cpu", 1000) is None                                       # the user has said


def test_prepare_applies_the_policy_before_any_work(tmp_path, monkeypatch):
    from apctl.presets import load_config
    from apctl.training.run import prepare

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for threads, expected in (("0", 1), ("2", 2)):
            torch.set_num_threads(3 - expected)
            cfg, _ = load_config("toy2d-ctm", ["training.eval_every=0", f"run.threads={threads}"])
            prepare(cfg, tmp_path / f"run{threads}")
            assert torch.get_num_threads() == expected, threads
    finally:
        torch.set_num_threads(before)


def test_cpu_presets_run_single_threaded(monkeypatch):
    from apctl.networks.student import parameter_count, student_architecture
    from apctl.plan import data_shape
    from apctl.presets import load_config
    from apctl.threads import chosen_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("toy2d", "toy2d-ctm", "toy2d-cd", "toy2d-isd", "digits", "digits-ctm", "digits-img", "digits-net",
                 "digits-net-ctm", "digits-teacher"):
        cfg, _ = load_config(name)
        shape, labels = data_shape(cfg)
        size = parameter_count(student_architecture(cfg.student, shape, labels))
        # auto (0), or 1 where a shipped file records it (digits-teacher: the config its teacher was trained with)
        assert cfg.run.threads in (0, 1) and chosen_threads(0, "cpu", size) == 1, (name, size)


# ------------------------------------------------------------------------------------------------
# The plan (--dry-run)


def _plan(preset: str, overrides=(), teacher=None, data=None):
    from apctl.cli.options import resolve_config
    from apctl.plan import make_plan

    cfg, path = resolve_config(preset, list(overrides), teacher, data)
    plan = make_plan(cfg, path, Path("/nonexistent/out"))
    return dict(plan.rows), plan.warnings


def test_plan_describes_the_teacher_file_given():
    """digits-net with the shipped 16×16, 1-channel teacher: its own architecture and parameter count
    (188,945, the count recorded in its JSON by the run that made it), not the preset network's."""
    recorded = json.loads(SHIPPED_TEACHER.with_suffix(".json").read_text())["parameter_count"]
    rows, warnings = _plan("digits-net", teacher=SHIPPED_TEACHER)
    assert recorded == 188_945
    assert "1 channel, 16×16, 10 classes, 188,945 parameters" in rows["teacher"], rows["teacher"]
    assert "188,945 teacher + " in rows["student"] and SHIPPED_TEACHER.name in rows["student"], rows["student"]
    assert rows["data shape"].startswith("(1, 16, 16), 10 classes"), rows["data shape"]
    assert "1,797 images" in rows["dataset"] and "(found)" in rows["dataset"]
    assert warnings == [], warnings


def test_plan_says_when_the_data_is_not_there(tmp_path):
    rows, warnings = _plan("digits-net", teacher=SHIPPED_TEACHER, data=tmp_path / "missing.zip")
    assert "NOT FOUND" in rows["dataset"], rows["dataset"]
    assert any("missing.zip" in w and "not found" in w for w in warnings), warnings


def test_plan_warns_of_a_teacher_that_does_not_fit_the_data(tmp_path):
    from PIL import Image

    folder = tmp_path / "rgb32"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    rows, warnings = _plan("digits-net", ["data.class_conditional=false"], teacher=SHIPPED_TEACHER, data=folder)
    assert "3 images of (3, 32, 32)" in rows["dataset"], rows["dataset"]
    assert any("(1, 16, 16)" in w and "(3, 32, 32)" in w for w in warnings), warnings


def test_plan_warns_of_device_batch_and_lpips(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))          # an empty hub cache
    overrides = ["training.batch_size=16", 'objective.distance.kind="lpips"',
                 f'objective.distance.lpips_trunk="{tmp_path / "no-such-trunk.pth"}"']
    if not torch.cuda.is_available():
        overrides.append('run.device="cuda"')
    rows, warnings = _plan("digits-img", overrides)
    text = " | ".join(warnings)
    assert "not divisible by the 3 processes" in text
    assert "no-such-trunk.pth" in rows["objective"] and "NOT FOUND" in rows["objective"], rows["objective"]
    assert "objective.distance.lpips_trunk" in text
    if not torch.cuda.is_available():
        assert rows["device"].startswith("cuda requested but not available") and "no CUDA device" in text


def test_plan_of_a_huge_network_allocates_nothing():
    """The largest MLP the config allows (4.4·10¹² parameters, 17 TB) is counted on the meta device."""
    from apctl.config import MAX_DEPTH, MAX_WIDTH

    rows, _ = _plan("toy2d", [f"student.depth={MAX_DEPTH}", f"student.hidden={MAX_WIDTH}"])
    count = int(re.search(r"([\d,]+) parameters", rows["student"]).group(1).replace(",", ""))
    assert count > MAX_DEPTH * MAX_WIDTH ** 2 // 2, rows["student"]


def test_absurd_sizes_are_one_line(tmp_path, cli):
    result = cli(["distill", "--dry-run", "--set", "student.depth=100000000000000000000000"], tmp_path)
    cli.user_error(result, "student.depth", "<= 1024")
    assert result.returncode == 1 and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# Strict JSON


def test_teacher_json_is_strict_and_both_forms_load(tmp_path):
    from apctl.networks import EDM_PRESET_KWARGS, build_preset
    from apctl.teachers.apctl_format import save_teacher
    from apctl.teachers.bundle import TeacherBundle
    from apctl.teachers.importers import load_teacher

    # the shipped teacher was written with the old `Infinity` token: it loads, to its recorded fingerprint
    old_text = SHIPPED_TEACHER.with_suffix(".json").read_text()
    assert "Infinity" in old_text
    shipped = load_teacher(SHIPPED_TEACHER)
    assert shipped.fingerprint == json.loads(old_text)["fingerprint"]
    assert shipped.arch["init_kwargs"]["sigma_max"] == math.inf

    # written again: strict JSON, the same fingerprint, and it loads back
    name = "tiny-songunet-16-uncond"
    bundle = TeacherBundle(build_preset(name), {"class_name": "EDMPrecond", "init_kwargs": EDM_PRESET_KWARGS[name]},
                           "apctl", "")
    weights, meta_path = save_teacher(bundle, tmp_path / "t.safetensors")
    meta = _strict_loads(meta_path.read_text())
    assert meta["init_kwargs"]["sigma_max"] == "inf"
    again = load_teacher(weights)
    assert again.fingerprint == meta["fingerprint"] == bundle.fingerprint
    _, copy_path = save_teacher(shipped, tmp_path / "copy.safetensors")
    assert _strict_loads(copy_path.read_text())["fingerprint"] == shipped.fingerprint


def test_strict_json_round_trip():
    from apctl.strict_json import decode_nonfinite, dumps

    value = {"a": [1.5, math.inf, -math.inf, math.nan], "b": {"c": "inf-like text"}}
    assert _strict_loads(dumps(value)) == {"a": [1.5, None, None, None], "b": {"c": "inf-like text"}}
    back = decode_nonfinite(_strict_loads(dumps(value, nonfinite="string")))
    assert back["a"][:3] == [1.5, math.inf, -math.inf] and math.isnan(back["a"][3]) and back["b"] == value["b"]


# ------------------------------------------------------------------------------------------------
# A tiny run through the CLI (in-process: typer's runner, whose output is not a terminal, like a pipe)


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ws = tmp_path_factory.mktemp("contract")
    _invoke("distill", "--preset", "toy2d-ctm", "--out", ws / "run", "--set", "training.iterations=2",
            "--set", "training.eval_every=0", "--set", "eval.nfe=[3]", "--set", "training.log_every=1")
    _invoke("precond", "compute", "--preset", "toy2d", "-o", ws / "stats.safetensors", "--threads", "1",
            "--set", "precond.statistics.n_points=8", "--set", "precond.statistics.n_samples=64")
    return ws


def test_eval_nfe_defaults_to_the_runs_eval_nfe_and_prints_strict_json(tiny):
    report = _strict_loads(_invoke("eval", "--ckpt", tiny / "run", "--json", "--n", "16", "--teacher-steps", "4"))
    assert sorted(report["results"]) == ["nfe=3"]


def test_eval_sigmas_measures_that_list_as_the_sampler_takes_it(tiny):
    """`--sigmas` gives one row under its NFE (len − 1) with exactly those levels, overriding --nfe; on the
    default 2-step list it reproduces the --nfe 2 row to the last digit, and another list measures another map."""
    common = ("--ckpt", tiny / "run", "--json", "--n", "16", "--teacher-steps", "4")
    by_nfe = _strict_loads(_invoke("eval", *common, "--nfe", "2"))["results"]["nfe=2"]
    listed = ",".join(repr(s) for s in by_nfe["sigmas"])
    by_list = _strict_loads(_invoke("eval", *common, "--nfe", "1,4", "--sigmas", listed))["results"]
    assert list(by_list) == ["nfe=2"] and by_list["nfe=2"] == by_nfe
    other = _strict_loads(_invoke("eval", *common, "--sigmas", "80,0.821,0.002"))["results"]
    assert list(other) == ["nfe=2"] and other["nfe=2"]["sigmas"] == [80.0, 0.821, 0.002]
    assert other["nfe=2"]["alignment_rms"] != by_nfe["alignment_rms"]


def test_sample_of_an_unconditional_student_writes_labels(tiny):
    _invoke("sample", "--ckpt", tiny / "run", "--out", tiny / "s.npz", "--n", "5")
    with np.load(tiny / "s.npz") as f:
        assert set(f.files) == {"samples", "labels", "sigmas"}
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == [-1] * 5


def test_checkpoint_and_metrics_are_strict_json(tiny):
    ckpt = tiny / "run" / "checkpoints" / "ckpt-0000002.json"
    meta = _strict_loads(ckpt.read_text())
    assert meta["step"] == 2
    rows = [_strict_loads(line) for line in (tiny / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_precond_inspect_json_csv_and_table_in_full(tiny):
    from apctl.preconditioning.report import coefficient_rows
    from apctl.preconditioning.statistics import load_statistics
    from apctl.schedules import karras_sigmas

    stats = tiny / "stats.safetensors"
    expected = coefficient_rows(load_statistics(stats), karras_sigmas(18))
    as_json = _strict_loads(_invoke("precond", "inspect", stats, "--json"))
    lines = _invoke("precond", "inspect", stats, "--csv").splitlines()
    header, body = lines[0].split(","), [[float(v) for v in ln.split(",")] for ln in lines[1:]]
    assert len(as_json["rows"]) == len(body) == 18
    for row, csv_row, ref in zip(as_json["rows"], body, expected):
        assert dict(zip(header, csv_row)) == row                           # the same numbers, bit for bit
        assert row["sigma"] == ref["sigma"] and row["l"] == ref["l"] and row["s"] == ref["s"]
        assert (row["ap_to_min_f"], row["ap_to_min_g"]) == ref["ap_to_min"]
    # not a terminal (rich would assume 80 columns): the table is printed whole, no cell cut short
    table = _invoke("precond", "inspect", stats)
    assert "…" not in table and f"{expected[5]['l']:.4f}" in table and f"{expected[5]['s']:+.4f}" in table


def test_precond_inspect_takes_the_grid_and_form_of_the_run_it_sits_in(tiny):
    """STATS beside a run's config.toml: --grid and --form default to that run's objective.grid_points (toy2d: 26)
    and precond.form, and the table says so; given options win; a file outside a run directory gets N = 18."""
    import shutil

    from apctl.presets import load_config

    run = tiny / "run"
    shutil.copy(tiny / "stats.safetensors", run / "precond_stats.safetensors")
    cfg, _ = load_config(str(run / "config.toml"))
    assert cfg.objective.grid_points == 26
    in_run = _strict_loads(_invoke("precond", "inspect", run / "precond_stats.safetensors", "--json"))
    assert (in_run["grid"], in_run["form"], len(in_run["rows"])) == (26, cfg.precond.form, 26)
    assert "N = 26 Karras grid" in _invoke("precond", "inspect", run / "precond_stats.safetensors") and "run/config.toml" in \
        _invoke("precond", "inspect", run / "precond_stats.safetensors")
    given = _strict_loads(_invoke("precond", "inspect", run / "precond_stats.safetensors", "--json", "--grid", "18",
                                  "--form", "forward"))
    assert (given["grid"], given["form"], len(given["rows"])) == (18, "forward", 18)
    alone = _strict_loads(_invoke("precond", "inspect", tiny / "stats.safetensors", "--json"))
    assert (alone["grid"], alone["form"]) == (18, "backward")
