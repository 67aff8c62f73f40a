"""The 2-step sampler's intermediate level (`apctl.metrics.two_step_level`, `apctl eval level`): the candidate
levels are the grid's inner ones, each row is what `apctl eval --sigmas σ_max,σ,σ_min` measures, and the lowest
figure is the one marked. The FID path is tested with the Inception network in tests/test_eval_protocol.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from apctl.errors import ApctlError
from apctl.metrics.two_step_level import inner_levels, lowest, two_step_sigmas
from oracles import karras     # EDM's eq. 5, written out independently of apctl.schedules


def test_the_candidates_are_the_inner_grid_levels_within_the_bounds():
    grid = karras(26)
    assert inner_levels(np.array(grid)) == pytest.approx(grid[1:-1])
    assert inner_levels(np.array(grid), 0.04, 0.1) == pytest.approx([g for g in grid if 0.04 <= g <= 0.1])
    assert len(inner_levels(np.array(grid), 0.04, 0.1)) == 2                 # 0.0851 and 0.0464
    with pytest.raises(ApctlError, match="no inner level"):
        inner_levels(np.array(grid), 90.0)
    with pytest.raises(ApctlError, match="no inner level"):
        inner_levels(np.array([80.0, 0.002]))
    assert two_step_sigmas(np.array(grid), 0.5) == [80.0, 0.5, pytest.approx(0.002)]


def test_lowest_is_the_minimum_of_the_figure_and_the_first_of_equals():
    rows = [{"level": 3.0, "sliced_w2": 0.2, "beyond_3sigma": 0.03}, {"level": 1.0, "sliced_w2": 0.1, "beyond_3sigma": 0.02},
            {"level": 0.5, "sliced_w2": 0.1, "beyond_3sigma": math.nan}]
    assert lowest(rows, "sliced_w2")["level"] == 1.0
    assert lowest(rows, "beyond_3sigma")["level"] == 1.0                     # a NaN is not a figure
    with pytest.raises(ApctlError, match="no level has a fid"):
        lowest(rows, "fid")
    with pytest.raises(ApctlError, match="--by must be one of"):
        lowest(rows, "loss")


def test_eval_level_rows_are_eval_sigmas_rows_and_the_lowest_is_marked(tmp_path, cli):
    """A short toy2d run: `eval level` on the eval probe (--seed 12345) gives, at each level, exactly what
    `eval --sigmas 80,σ,0.002` gives; by default it draws its own probe (eval.seed + 1) and minimises the
    fraction beyond 3σ (a Gaussian-mixture teacher); bad bounds or --by are one line."""
    sets = ["--set", "training.iterations=30", "--set", "precond.statistics.n_samples=256", "--set", "eval.n_samples=128"]
    cli.ok(cli(["distill", "--preset", "toy2d", "--out", "run", *sets], tmp_path))
    common = ["--ckpt", "run", "--n", "128", "--json"]
    on_eval = json.loads(cli.ok(cli(["eval", "level", *common, "--seed", "12345", "--min-level", "0.04",
                                     "--max-level", "0.1"], tmp_path)).stdout)
    assert [r["level"] for r in on_eval["rows"]] == pytest.approx([0.0851, 0.0464], abs=1e-4)
    for row in on_eval["rows"]:
        listed = ",".join(map(repr, row["sigmas"]))
        single = json.loads(cli.ok(cli(["eval", *common, "--sigmas", listed], tmp_path)).stdout)["results"]["nfe=2"]
        for key in ("alignment_rms", "sliced_w2", "beyond_3sigma"):
            assert single[key] == row[key], key
    assert on_eval["by"] == "beyond_3sigma" and on_eval["seed"] == 12345
    assert on_eval["best"] == min(on_eval["rows"], key=lambda r: r["beyond_3sigma"])
    own = json.loads(cli.ok(cli(["eval", "level", *common, "--max-level", "0.1", "--by", "sliced_w2"], tmp_path)).stdout)
    assert own["seed"] == 12346 and own["by"] == "sliced_w2" and len(own["rows"]) == 5      # 0.0851 … 0.00506
    assert own["best"]["sliced_w2"] == min(r["sliced_w2"] for r in own["rows"])
    assert own["rows"][0]["alignment_rms"] != on_eval["rows"][0]["alignment_rms"]     # other noise, other figures
    bounds = ["--ckpt", "run", "--n", "128", "--min-level", "0.04", "--max-level", "0.1"]
    best = json.loads(cli.ok(cli(["eval", "level", *bounds, "--json"], tmp_path)).stdout)["best"]["level"]
    table = cli.ok(cli(["eval", "level", *bounds], tmp_path)).stdout
    assert f"lowest beyond_3sigma: σ = {best:.4g}. Sample through it: --sigmas 80,{best:.4g},0.002" in table
    assert f"name it for new runs: --set 'eval.levels.2=[80, {best:.4g}, 0.002]'" in table
    cli.user_error(cli(["eval", "level", "--ckpt", "run", "--min-level", "100"], tmp_path), "no inner level")
    cli.user_error(cli(["eval", "level", "--ckpt", "run", "--by", "fid"], tmp_path), "--fid REF.npz")
    cli.user_error(cli(["eval", "level", "--ckpt", "run", "--by", "loss"], tmp_path), "--by")
