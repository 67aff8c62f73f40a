"""A run's σ lists (`apctl.sampling.SigmaPolicy`, the `[eval.levels]` table): a named NFE list replaces the
Karras levels for that NFE only, its inner levels snap to the nearest grid level in ln σ, an explicit
--sigma-schedule replaces the named lists, bad tables are one line naming the key, and every command that
samples a student (distill's probe and samples, eval, sample) uses the named list."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from apctl.config import ConfigError, config_from_dict
from apctl.presets import config_to_toml, load_config
from apctl.sampling import SigmaPolicy, default_sigmas
from oracles import karras     # EDM's eq. 5, written out independently of apctl.schedules


def nearest_in_log(value: float, grid: list[float]) -> float:
    return min(grid, key=lambda g: abs(math.log(g) - math.log(value)))


GRID = np.array(karras(26))


@pytest.mark.parametrize("schedule", ["grid", "karras"])
def test_without_a_named_list_every_nfe_gets_the_default_schedule(schedule):
    policy = SigmaPolicy(schedule, {3: (80.0, 1.0, 0.1, 0.002)})
    for nfe in (1, 2, 4, 5):
        assert policy.sigmas(nfe, GRID) == default_sigmas(nfe, GRID, schedule)
    assert SigmaPolicy(schedule).sigmas(2, GRID) == default_sigmas(2, GRID, schedule)


def test_a_named_list_snaps_its_inner_levels_to_the_nearest_grid_level():
    grid = GRID.tolist()
    two = SigmaPolicy("grid", {2: (80.0, 0.05, 0.002)}).sigmas(2, GRID)
    assert two[0] == 80.0 and two[-1] == 0.002                      # the ends as written
    assert two[1] == nearest_in_log(0.05, grid) and two[1] != 0.05
    assert abs(two[1] - 0.0464) < 1e-4                               # toy2d's level: grid point 22 of 26
    three = SigmaPolicy("grid", {3: (80.0, 5.0, 0.05, 0.002)}).sigmas(3, GRID)
    assert three[1:3] == [nearest_in_log(5.0, grid), nearest_in_log(0.05, grid)]


def test_the_karras_schedule_takes_a_named_list_as_written():
    assert SigmaPolicy("karras", {2: (80.0, 0.05, 0.002)}).sigmas(2, GRID) == [80.0, 0.05, 0.002]
    assert SigmaPolicy("grid", {2: (80.0, 0.05, 0.002)}).sigmas(2, None) == [80.0, 0.05, 0.002]   # no grid: as written


def test_two_inner_levels_on_one_grid_level_is_an_error():
    from apctl.errors import ApctlError

    with pytest.raises(ApctlError, match="strictly decrease"):
        SigmaPolicy("grid", {3: (80.0, 0.050, 0.049, 0.002)}).sigmas(3, GRID)


def test_an_explicit_schedule_replaces_the_runs_named_lists():
    cfg, _ = load_config("toy2d", ["eval.levels.2=[80, 0.05, 0.002]"])
    run = SigmaPolicy.of(cfg.eval)
    assert run.schedule == "grid" and run.levels == {2: (80.0, 0.05, 0.002)}
    karras_policy = SigmaPolicy.of(cfg.eval, "karras")
    assert karras_policy.levels == {}
    assert karras_policy.sigmas(2, GRID) == pytest.approx(karras(3))    # CTM's exact sampler: 80 → 2.515 → 0.002
    assert abs(karras(3)[1] - 2.515) < 1e-3


def test_describe_is_the_schedule_alone_without_named_lists():
    """Curve caches key on it: runs that name nothing keep the keys they had before `[eval.levels]` existed."""
    assert SigmaPolicy("grid").describe() == "grid" and SigmaPolicy("karras").describe() == "karras"
    assert SigmaPolicy("grid", {2: (80.0, 0.05, 0.002)}).describe() == \
        {"schedule": "grid", "levels": {"2": [80.0, 0.05, 0.002]}}


@pytest.mark.parametrize("override, fragment", [
    ("eval.levels.2=[80, 0.002]", "NFE 2 takes a list of 3 σ levels"),
    ("eval.levels.0=[80]", "integers from 1"),
    ("eval.levels.two=[80, 1, 0.002]", "integers from 1"),
    ("eval.levels.2=[80, 90, 0.002]", "strictly decreasing"),
    ("eval.levels.2=[80, 0, -1]", "positive"),
    ('eval.levels.2=[80, "1", 0.002]', "takes a list of 3"),
    ("eval.levels=3", "expected a table"),
])
def test_a_bad_levels_table_is_one_error_naming_its_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("toy2d", [override])
    key = override.split("=")[0]
    assert f"key '{key}'" in str(err.value) and fragment in str(err.value)


def test_named_lists_survive_the_saved_config():
    """config.toml and checkpoints store the config as plain data; loading it back gives the same lists."""
    import tomllib

    cfg, _ = load_config("toy2d", ["eval.levels.3=[80, 2, 0.05, 0.002]"])
    again = config_from_dict(tomllib.loads(config_to_toml(cfg)), "config.toml")
    assert SigmaPolicy.of(again.eval) == SigmaPolicy.of(cfg.eval)
    assert set(again.eval.levels) == {"2", "3"}                      # the preset's 2 and the --set 3


def test_the_shipped_toy2d_names_a_grid_level_for_two_steps():
    cfg, _ = load_config("toy2d")
    policy = SigmaPolicy.of(cfg.eval)
    grid = karras(cfg.objective.grid_points)
    two = policy.sigmas(2, np.array(grid))
    assert set(policy.levels) == {2} and two[1] in grid and two[1] == nearest_in_log(cfg.eval.levels["2"][1], grid)


def test_every_command_samples_on_the_named_list(tmp_path, cli):
    """distill's plan, its probe and samples; eval; sample: all on 80 → the grid level → 0.002; and an explicit
    --sigma-schedule karras goes back to 2.515."""
    level = nearest_in_log(0.05, karras(26))
    sets = ["--set", "training.iterations=2", "--set", "precond.statistics.n_samples=256", "--set", "eval.n_samples=64",
            "--set", "training.eval_every=1", "--set", "eval.levels.2=[80, 0.05, 0.002]"]
    plan = cli.ok(cli(["distill", "--preset", "toy2d", "--out", "run", "--dry-run", *sets], tmp_path,
                      ))
    assert f"NFE 2: 80 → {level:.4g} → 0.002 (eval.levels)" in plan.stdout
    cli.ok(cli(["distill", "--preset", "toy2d", "--out", "run", *sets], tmp_path))
    report = json.loads(cli.ok(cli(["eval", "--ckpt", "run", "--nfe", "1,2", "--n", "32", "--json"], tmp_path)).stdout)
    assert report["results"]["nfe=2"]["sigmas"] == [80.0, level, 0.002]
    assert report["results"]["nfe=1"]["sigmas"] == pytest.approx([80.0, 0.002])
    cli.ok(cli(["sample", "--ckpt", "run", "--nfe", "2", "--n", "8", "--out", "s.npz"], tmp_path))
    assert np.load(tmp_path / "s.npz")["sigmas"].tolist() == [80.0, level, 0.002]
    cli.ok(cli(["sample", "--ckpt", "run", "--nfe", "2", "--n", "8", "--out", "k.npz", "--sigma-schedule", "karras"],
               tmp_path))
    assert np.load(tmp_path / "k.npz")["sigmas"].tolist() == pytest.approx(karras(3))
    # distill's own probe sampled the same list: its 2-step figure is eval's on the run's probe
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    probe_rms = [r["align_nfe2"] for r in rows if "align_nfe2" in r][-1]
    again = json.loads(cli.ok(cli(["eval", "--ckpt", "run", "--nfe", "2", "--n", "64", "--json"], tmp_path)).stdout)
    assert again["results"]["nfe=2"]["alignment_rms"] == pytest.approx(probe_rms, rel=1e-5)


@pytest.mark.parametrize("preset", ["toy2d-isd", "toy2d-cd"])
def test_presets_that_keep_ctms_level_sample_as_before_the_table(preset):
    """toy2d-isd and toy2d-cd write CTM's Karras level (2.515) over toy2d's tuned one: on their grid it is the
    default list (to the last bits of σ_min), so their recorded figures still describe them; toy2d-ctm inherits toy2d's."""
    cfg, _ = load_config(preset)
    grid = np.array(karras(cfg.objective.grid_points))
    assert SigmaPolicy.of(cfg.eval).sigmas(2, grid) == pytest.approx(default_sigmas(2, grid, "grid"), rel=1e-15)
    ctm, _ = load_config("toy2d-ctm")
    assert ctm.eval.levels == load_config("toy2d")[0].eval.levels
