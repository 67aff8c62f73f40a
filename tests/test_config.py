"""Presets and the typed config: every shipped preset validates, the paper presets carry the paper's
settings, `--dry-run` prints the right plan without any files, and every kind of bad input is
reported with the file (or the `--set`) and the dotted key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from apctl.config import Config
from apctl.presets import config_to_toml, load_config, parse_override
from apctl.errors import ApctlError

# Parametrization needs the list at import time, so this mirrors conftest's PRESET_DIR.
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESET_FILES = sorted(PRESET_DIR.glob("*.toml"))


def test_presets_are_shipped():
    names = {p.stem for p in PRESET_FILES}
    assert {"toy2d", "toy2d-cd", "toy2d-ctm", "toy2d-isd", "digits", "digits-img",
            "cifar10-uncond", "cifar10-cond", "ffhq64", "imagenet64"} <= names, names


# ------------------------------------------------------------------------------------------------
# Every shipped config is validated (by file path and by name).


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_shipped_preset_loads_and_validates(path):
    cfg, resolved = load_config(str(path))
    assert isinstance(cfg, Config)
    assert resolved == path
    by_name, resolved_by_name = load_config(path.stem)
    assert resolved_by_name.resolve() == path.resolve()
    assert by_name == cfg
    assert cfg.run.name == path.stem, "run.name should match the preset's file name (default run directory)"


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_config_to_toml_round_trips(path, tmp_path):
    cfg, _ = load_config(str(path))
    saved = tmp_path / "saved.toml"
    saved.write_text(config_to_toml(cfg))
    again, _ = load_config(str(saved))
    assert again == cfg


# ------------------------------------------------------------------------------------------------
# The paper's Table 3 (Zheng et al., ICLR 2025, App. B.2), written out independently of presets/.

PAPER = {
    #                  lr    μ      N   max steps EMA     iterations batch  teacher file                        classes  GPUs
    "cifar10-uncond": (4e-4, 0.999, 18, 17, 0.999, 200_000, 256, "edm-cifar10-32x32-uncond-vp.pkl", 0, 4),
    "cifar10-cond": (4e-4, 0.999, 18, 17, 0.999, 150_000, 512, "edm-cifar10-32x32-cond-vp.pkl", 10, 8),
    "ffhq64": (4e-4, 0.999, 18, 17, 0.999, 150_000, 256, "edm-ffhq-64x64-uncond-vp.pkl", 0, 8),
    "imagenet64": (4e-4, 0.999, 40, 20, 0.999, 60_000, 2048, "edm-imagenet-64x64-cond-adm.pkl", 1000, 32),
}

# Teacher parameter counts: EDM's networks, from the layer-by-layer references in tests/test_networks.py
# (EXPECTED_PARAMS there). The student adds the s-embedding E = Linear(noise_ch → emb) ∘ silu ∘ Linear(emb → emb)
# (positional embeddings have no parameters), noise_ch = model_channels · channel_mult_noise, emb = 4 · model_channels:
# DDPM++ 128 → 512, ADM 192 → 768.
TEACHER_PARAMS = {
    "cifar10-uncond": 55_733_891,
    "cifar10-cond": 55_735_299,
    "ffhq64": 61_805_571,
    "imagenet64": 295_899_267,
}


def _s_embedding(noise_channels: int, emb_channels: int) -> int:
    return (noise_channels * emb_channels + emb_channels) + (emb_channels * emb_channels + emb_channels)


S_EMBEDDING = {
    "cifar10-uncond": _s_embedding(128, 512),
    "cifar10-cond": _s_embedding(128, 512),
    "ffhq64": _s_embedding(128, 512),
    "imagenet64": _s_embedding(192, 768),
}


def test_s_embedding_closed_form():
    assert S_EMBEDDING["cifar10-cond"] == 328_704
    assert S_EMBEDDING["imagenet64"] == 738_816


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_carry_table_3(name):
    lr, mu, n, max_steps, ema, iters, batch, teacher_file, classes, _ = PAPER[name]
    cfg, _ = load_config(name)
    assert cfg.training.lr == lr
    assert cfg.objective.target_ema == mu
    assert cfg.objective.grid_points == n
    assert cfg.objective.ctm.max_teacher_steps == max_steps
    assert cfg.training.ema_decay == ema
    assert cfg.training.iterations == iters
    assert cfg.training.precision == "fp16"
    assert cfg.training.batch_size == batch
    assert cfg.objective.distance.kind == "lpips"
    assert cfg.objective.kind == "ctm"
    assert cfg.training.optimizer == "radam"           # CTM's optimizer, weight decay 0
    assert cfg.precond.kind == "analytic"
    assert cfg.teacher.kind == "network"
    assert cfg.teacher.file == teacher_file
    assert cfg.student.kind == "unet"
    assert cfg.student.network == teacher_file         # the student is the teacher's network + s-embedding
    assert cfg.student.init_from_teacher is True
    assert cfg.data.class_conditional is bool(classes)


def _plan_rows(stdout: str) -> dict[str, str]:
    """The dry-run table as {key: value}; wrapped cells are joined."""
    rows: dict[str, str] = {}
    key = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("|", "│").strip().strip("│┃").split("│")]
        if len(cells) != 2:
            continue
        k, v = cells
        if k:
            key = k
            rows[key] = v
        elif key is not None:
            rows[key] += " " + v
    return rows


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dry_run_of_paper_preset_prints_the_plan_without_files(name, cli, tmp_path):
    lr, mu, n, max_steps, ema, iters, batch, teacher_file, classes, gpus = PAPER[name]
    # Plan for the paper's GPU count: the per-device batch is the global batch split over WORLD_SIZE.
    # An empty HOME and no $APCTL_TEACHERS / $APCTL_DATA: no teacher or data file can be found anywhere.
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    env = cli.env(WORLD_SIZE=str(gpus), HOME=str(home), APCTL_TEACHERS="", APCTL_DATA="")
    result = cli.ok(cli(["distill", "--preset", name, "--dry-run"], work, env=env))
    rows = _plan_rows(result.stdout)
    teacher, s_emb = TEACHER_PARAMS[name], S_EMBEDDING[name]
    assert f"{teacher:,} teacher + {s_emb:,} s-embedding" in rows["student"], rows["student"]
    assert teacher_file in rows["student"]
    assert teacher_file in rows["teacher"] and "NOT FOUND" in rows["teacher"]
    assert rows["grid"].startswith(f"N = {n} Karras levels"), rows["grid"]
    assert rows["max teacher Heun steps"] == str(max_steps)
    assert rows["optimizer"] == f"radam (β 0.9, 0.999), lr {lr:g}"
    assert rows["target EMA μ"] == f"{mu:g}"
    assert rows["evaluation EMA"] == f"{ema:g}"
    assert rows["iterations"] == f"{iters:,}"
    assert rows["precision"] == "fp16"
    assert rows["batch"] == f"{batch} global = {gpus} device(s) × {batch // gpus} per device"
    assert rows["objective"].startswith("CTM, distance lpips")
    assert rows["preconditioning"].startswith("Analytic-Precond (backward form")
    assert rows["data shape"].startswith(("(3, 32, 32)" if "cifar" in name else "(3, 64, 64)"))
    assert (f"{classes} classes" if classes else "no classes") in rows["data shape"]
    assert not any(work.iterdir()) and not any(home.iterdir()), "a dry run must not write anything"


def test_dry_run_finds_teachers_where_distill_looks(tmp_path, monkeypatch):
    """The plan says whether the teacher file will be found; it must look where `distill` looks
    (the path as given, then $APCTL_TEACHERS and ~/.cache/apctl/teachers)."""
    from apctl.plan import describe_plan

    teachers = tmp_path / "teachers"
    teachers.mkdir()
    (teachers / "edm-cifar10-32x32-cond-vp.pkl").write_bytes(b"placeholder")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg, path = load_config("cifar10-cond")

    monkeypatch.setenv("APCTL_TEACHERS", "")
    rows = dict(describe_plan(cfg, path, tmp_path / "out"))
    assert "NOT FOUND" in rows["teacher"], rows["teacher"]

    monkeypatch.setenv("APCTL_TEACHERS", str(teachers))
    rows = dict(describe_plan(cfg, path, tmp_path / "out"))
    assert "NOT FOUND" not in rows["teacher"], rows["teacher"]


def test_plan_states_the_optimizer_and_the_learning_rate_schedule():
    """The plan's optimizer row names the optimizer, its β and the schedule the run will follow: toy2d's
    Adam holds lr over 30% of its 8,000 steps (decay from step 2,400); a warm-up and no hold decay from
    the warm-up's end."""
    from apctl.plan import describe_plan

    cfg, path = load_config("toy2d")
    assert dict(describe_plan(cfg, path, Path("out")))["optimizer"] == "adam (β 0.9, 0.99), lr 0.003, linear decay from step 2,400 to 0·lr"
    cfg, path = load_config("toy2d", ["training.lr_warmup=100", "training.lr_hold=0", 'training.lr_schedule="cosine"'])
    assert dict(describe_plan(cfg, path, Path("out")))["optimizer"] == "adam (β 0.9, 0.99), lr 0.003, warm-up 100 steps, cosine decay to 0·lr"
    cfg, path = load_config("toy2d", ['training.lr_schedule="constant"', 'training.optimizer="radam"', "training.betas=[0.9, 0.999]"])
    assert dict(describe_plan(cfg, path, Path("out")))["optimizer"] == "radam (β 0.9, 0.999), lr 0.003"


def test_dry_run_parameter_count_matches_the_student_that_trains():
    """The plan's count must be the count of the network `apctl distill` actually builds (digits-img:
    1-channel images with the cpu-songunet-16 student)."""
    from apctl.networks.registry import count_parameters
    from apctl.networks.student import build_student, student_architecture
    from apctl.plan import _student_parameters, data_shape

    for name in ("digits-img", "toy2d", "digits"):
        cfg, _ = load_config(name)
        shape, label_dim = data_shape(cfg)
        built = build_student(student_architecture(cfg.student, shape, label_dim))
        _, planned = _student_parameters(cfg, shape, label_dim)
        assert planned == count_parameters(built), (name, planned, count_parameters(built))


# ------------------------------------------------------------------------------------------------
# Bad presets and overrides: one line naming the file (or the --set) and the dotted key.


def _write(tmp_path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(preset: str, overrides=()) -> str:
    with pytest.raises(ApctlError) as exc:
        load_config(preset, list(overrides))
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("body, key, reason", [
    ('extends = "toy2d"\n[training]\nlrr = 1e-3\n', "training.lrr", "unknown key"),
    ('extends = "toy2d"\n[precond.statistics]\nn_sample = 3\n', "precond.statistics.n_sample", "unknown key"),
    ('extends = "toy2d"\nepochs = 3\n', "epochs", "unknown key"),
    ('extends = "toy2d"\n[training]\nlr = "fast"\n', "training.lr", "expected a number"),
    ('extends = "toy2d"\n[training]\niterations = 1.5\n', "training.iterations", "expected an integer"),
    ('extends = "toy2d"\n[data]\nxflip = 1\n', "data.xflip", "expected true or false"),
    ('extends = "toy2d"\ntraining = 3\n', "training", "expected a table"),
    ('extends = "toy2d"\n[objective]\ntarget_ema = 1.5\n', "objective.target_ema", "<= 1.0"),
    ('extends = "toy2d"\n[training]\nlr = 0.0\n', "training.lr", "> 0.0"),
    ('extends = "toy2d"\n[training]\niterations = 0\n', "training.iterations", ">= 1"),
    ('extends = "toy2d"\n[precond]\nkind = "magic"\n', "precond.kind", "must be one of"),
    ('extends = "toy2d"\n[training]\nprecision = "fp8"\n', "training.precision", "must be one of"),
    ('extends = "toy2d"\n[objective.ctm]\nmax_teacher_steps = 26\n', "objective.ctm.max_teacher_steps", "grid_points"),
    ('extends = "toy2d"\n[objective.distance]\nkind = "lpips"\n', "objective.distance.kind", "unet"),
    ("extends = 3\n", "extends", "preset name"),
])
def test_bad_preset_names_file_and_key(tmp_path, body, key, reason):
    path = _write(tmp_path, body)
    msg = _error(str(path))
    assert str(path) in msg, msg
    assert f"'{key}'" in msg, msg
    assert reason in msg, msg


@pytest.mark.parametrize("parent", ["no-such-preset", "no-such-file.toml"])
def test_bad_extends_names_file_and_key(tmp_path, parent):
    """`extends` pointing nowhere must say which file's `extends` is wrong, not just 'unknown preset'."""
    path = _write(tmp_path, f'extends = "{parent}"\n[training]\nlr = 1e-3\n', "child.toml")
    msg = _error(str(path))
    assert parent in msg, msg
    assert str(path) in msg, msg
    assert "extends" in msg, msg


def test_extends_cycle_is_refused(tmp_path):
    _write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    _write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    msg = _error(str(tmp_path / "a.toml"))
    assert "cycle" in msg and "extends" in msg


def test_extends_inherits_and_overrides(tmp_path):
    path = _write(tmp_path, 'extends = "toy2d"\n[run]\nname = "child"\n[training]\nlr = 2e-3\n', "child.toml")
    cfg, _ = load_config(str(path))
    base, _ = load_config("toy2d")
    assert cfg.training.lr == 2e-3 and cfg.run.name == "child"
    assert cfg.teacher == base.teacher and cfg.objective == base.objective
    assert cfg.training.iterations == base.training.iterations


def test_invalid_toml_names_file_and_line(tmp_path):
    path = _write(tmp_path, '[training\nlr = 1e-3\n')
    msg = _error(str(path))
    assert str(path) in msg and "TOML" in msg and "line 1" in msg, msg


def test_missing_and_unknown_presets():
    assert "unknown preset 'no-such-preset'" in _error("no-such-preset")
    assert "toy2d" in _error("no-such-preset"), "the message should list the available presets"
    assert "not found" in _error("/nonexistent/dir/x.toml")


@pytest.mark.parametrize("override, key, reason", [
    ("training.lrr=1e-3", "training.lrr", "unknown key"),
    ("trainin.lr=1e-3", "trainin", "unknown key"),
    ("training.lr=abc", "training.lr", "expected a number"),
    ("training.lr=-1", "training.lr", "> 0.0"),
    ("training.iterations=1.5", "training.iterations", "expected an integer"),
    ("training.iterations=true", "training.iterations", "expected an integer"),
    ("training.precision=fp8", "training.precision", "must be one of"),
    ("training={lr=-1.0}", "training.lr", "> 0.0"),
    ("training=3", "training", "expected a table"),
    ("data.xflip=yes", "data.xflip", "expected true or false"),
])
def test_bad_set_names_the_set_and_key(override, key, reason):
    msg = _error("toy2d", [override])
    assert f"--set {override}" in msg, msg
    assert f"'{key}'" in msg, msg
    assert reason in msg, msg


@pytest.mark.parametrize("override, key", [
    ("eval.nfe=[1, 0]", "eval.nfe"),
    ("training.betas=[0.9]", "training.betas"),
    ("training.betas=[0.9, 1.0]", "training.betas"),
    ("training.betas=[-0.1, 0.99]", "training.betas"),
    ("training.betas=[true, 0.99]", "training.betas"),
    ('training.betas=[0.9, "0.99"]', "training.betas"),
    ("objective.ctm.max_teacher_steps=30", "objective.ctm.max_teacher_steps"),
    ('objective.kind="ect"', "objective.kind"),          # toy2d's student is an MLP; ECT tunes a UNet
])
def test_cross_field_error_caused_by_a_set_names_the_set(override, key):
    """A value only the `--set` supplied must be blamed on the `--set`, not on the preset file."""
    msg = _error("toy2d", [override])
    assert f"'{key}'" in msg, msg
    assert f"--set {override}" in msg, msg


@pytest.mark.parametrize("text", ["training.lr", "=3", ".lr=3", "training..lr=3"])
def test_malformed_set(text):
    assert "--set" in _error("toy2d", [text])


# ------------------------------------------------------------------------------------------------
# --set values are read as TOML.


@pytest.mark.parametrize("text, keys, value", [
    ("training.iterations=10", ["training", "iterations"], 10),
    ("training.lr=1e-4", ["training", "lr"], 1e-4),
    ("training.lr = 2.5e-4", ["training", "lr"], 2.5e-4),
    ('run.name="two words"', ["run", "name"], "two words"),
    ("run.name='literal'", ["run", "name"], "literal"),
    ("run.name=bare", ["run", "name"], "bare"),
    ("teacher.file=/path with spaces/edm.pkl", ["teacher", "file"], "/path with spaces/edm.pkl"),
    ("data.xflip=true", ["data", "xflip"], True),
    ("data.xflip=false", ["data", "xflip"], False),
    ("eval.nfe=[1, 3]", ["eval", "nfe"], [1, 3]),
    ("teacher.means=[[0.0, 1.0], [2, 3]]", ["teacher", "means"], [[0.0, 1.0], [2, 3]]),
])
def test_parse_override_reads_toml(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_set_values_reach_the_config():
    cfg, _ = load_config("toy2d", [
        "training.iterations=10", "training.lr=1", 'run.name="a b"', "data.xflip=true", "eval.nfe=[1, 3]",
        "precond.statistics.n_samples=256", "teacher.stds=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2]",
        "training.lr=3e-4",  # later --set wins
    ])
    assert cfg.training.iterations == 10
    assert cfg.training.lr == 3e-4 and isinstance(cfg.training.lr, float)
    assert cfg.run.name == "a b"
    assert cfg.data.xflip is True
    assert cfg.eval.nfe == [1, 3]
    assert cfg.precond.statistics.n_samples == 256
    assert cfg.teacher.stds[-1] == 0.2


def test_int_is_accepted_for_float_keys():
    cfg, _ = load_config("toy2d", ["training.lr=1"])
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    assert "finite" in _error("toy2d", ["training.lr=inf"])
    assert "finite" in _error("toy2d", ["training.lr=nan"])


# ------------------------------------------------------------------------------------------------
# config_to_toml round-trips (config.toml is saved with every run and must re-load).


@pytest.mark.parametrize("name", [
    'quote"inside', "back\\slash", "C:\\runs\\x", "σ-ü unicode", "tab\there", "hash # not a comment",
    "new\nline", "bell\x07", "del\x7f",
])
def test_config_to_toml_round_trips_any_string(tmp_path, name):
    cfg, _ = load_config("toy2d", ["training.lr=0.1", "precond.statistics.ridge=1e-300", "teacher.stds=0"])
    cfg.run.name = name
    cfg.teacher.classes = [0, 1, 0, 1, 0, 1, 0, 1]
    saved = _write(tmp_path, config_to_toml(cfg), "saved.toml")
    again, _ = load_config(str(saved))
    assert again == cfg
    assert not math.isnan(again.training.lr)


# ------------------------------------------------------------------------------------------------
# Per-kind objective sections: only the active kind's section may be given; changing the kind in a
# later layer (extends, --set) drops the inherited section of the old kind.


def test_section_of_another_objective_kind_is_an_error(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('extends = "toy2d"\n[objective]\nkind = "cd"\n[objective.ctm]\ndsm_weight = 2.0\n')
    with pytest.raises(ApctlError) as info:
        load_config(str(preset))
    message = str(info.value)
    assert str(preset) in message and "objective.ctm" in message and "'cd'" in message, message


def test_a_set_into_another_kinds_section_names_the_set():
    with pytest.raises(ApctlError) as info:
        load_config("toy2d-cd", ["objective.ctm.dsm_weight=2"])
    assert "--set objective.ctm.dsm_weight=2" in str(info.value) and "objective.ctm" in str(info.value)


def test_changing_the_kind_drops_the_inherited_section(tmp_path):
    cfg, _ = load_config("toy2d-cd")           # extends toy2d, whose [objective.ctm] is not inherited
    assert cfg.objective.kind == "cd" and cfg.objective.ctm is None and cfg.objective.cd is not None
    assert "ctm" not in cfg.to_dict()["objective"]
    cfg, _ = load_config("toy2d", ["objective.kind=cd"])
    assert cfg.objective.ctm is None and cfg.objective.section is cfg.objective.cd
    cfg, _ = load_config("toy2d-cd", ["objective.kind=ctm"])   # back to CTM: the section takes its defaults
    assert cfg.objective.ctm.max_teacher_steps == 17 and cfg.objective.ctm.dsm_weight == 1.0


def test_active_section_exists_even_when_not_written(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('extends = "toy2d"\n[objective]\nkind = "ctm"\n')
    cfg, _ = load_config(str(preset))
    assert cfg.objective.section is cfg.objective.ctm and cfg.objective.cd is None


def test_command_line_paths_are_plain_values_not_toml(tmp_path):
    """--teacher/--data reach the config as given, however the path is spelled (quotes, backslashes)."""
    odd = str(tmp_path / 'we"ird\\na me.pkl')
    cfg, _ = load_config("cifar10-cond", [], {"teacher": {"kind": "network", "file": odd}})
    assert cfg.teacher.file == odd


def test_a_rule_broken_by_one_set_may_be_mended_by_the_next():
    """Cross-field rules see the command line as a whole: grid_points=6 alone breaks max_teacher_steps ≤ N − 1,
    the next --set mends it; the same two in the other order, or the first alone, are checked at the end."""
    cfg, _ = load_config("toy2d", ["objective.grid_points=6", "objective.ctm.max_teacher_steps=3"])
    assert cfg.objective.grid_points == 6 and cfg.objective.ctm.max_teacher_steps == 3
    with pytest.raises(ApctlError) as info:
        load_config("toy2d", ["objective.grid_points=6"])
    assert "--set objective.grid_points=6" in str(info.value) and "max_teacher_steps" in str(info.value)


@pytest.mark.parametrize("section, key, builders", [
    ("StudentConfig", "activation", "apctl.networks.mlp:ACTIVATIONS"),
    ("TrainingConfig", "optimizer", "apctl.training.optimizer:OPTIMIZERS"),
])
def test_the_choices_a_key_accepts_are_the_names_its_builder_knows(section, key, builders):
    """config.py lists a key's choices without importing torch; the builder maps the same names to modules
    or classes. A name in one list and not the other would fail only when a run starts."""
    import dataclasses
    import importlib

    import apctl.config

    module, table = builders.split(":")
    field, = (f for f in dataclasses.fields(getattr(apctl.config, section)) if f.name == key)
    assert set(field.metadata["choices"]) == set(getattr(importlib.import_module(module), table))


def test_only_the_kinds_that_use_the_distance_section_plan_one():
    """[objective.distance] serves CTM and CD alone: their plan names it; the plans of ECT, iSD and EDM's loss,
    which set their losses in their own sections, do not."""
    from apctl.objectives import uses_distance
    from apctl.plan import describe_plan

    for name, kind in [("toy2d", "ctm"), ("toy2d-cd", "cd"), ("digits-ect", "ect"), ("toy2d-isd", "isd"),
                       ("digits-teacher", "edm")]:
        cfg, path = load_config(name)
        assert cfg.objective.kind == kind and uses_distance(cfg.objective) == (kind in ("ctm", "cd"))
        planned = dict(describe_plan(cfg, path, Path("out")))["objective"]
        assert (", distance " in planned) == uses_distance(cfg.objective), planned
