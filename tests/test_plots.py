"""Pictures: the image grid's geometry, the 2-D overlay's two series, metrics.png written by a training
run's checkpoints, and `precond plot` naming the teacher its statistics file records.

The figures are inspected as matplotlib objects (what was drawn, with which labels) before or instead
of being rendered; written files are checked to be PNGs of the figure the builder makes. One tiny
toy2d run (4 iterations, checkpoints at 2 and 4, statistics on 8 levels) serves the run-level tests.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from apctl.plots import (
    PADDING,
    PADDING_VALUE,
    figure_image_grid,
    figure_metrics,
    figure_samples_2d,
    grid_rows,
    image_grid,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ------------------------------------------------------------------------------------------------
# Image grids


def test_grid_rows_put_one_class_per_row_in_sample_order():
    labels = [3, 1, 3, 0, 1, 3, 3]
    rows = grid_rows(len(labels), labels)
    assert rows == [[3], [1, 4], [0, 2, 5, 6]]       # classes ascending, each class's samples in order
    assert sorted(i for r in rows for i in r) == list(range(len(labels)))


def test_grid_rows_wrap_a_class_longer_than_the_row_and_cover_unlabelled_samples():
    rows = grid_rows(20, [5] * 20)                     # one class, 20 samples: rows of max(8, ⌈√20⌉) = 8
    assert [len(r) for r in rows] == [8, 8, 4] and [i for r in rows for i in r] == list(range(20))
    rows = grid_rows(10)                               # unlabelled: row-major, ⌈√10⌉ = 4 columns
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_geometry_padding_and_cells(channels):
    rng = np.random.default_rng(0)
    n, h, w = 7, 5, 4
    # Values on the uint8 lattice (k/127.5 − 1), so every cell must come back exactly.
    pixels = rng.integers(0, 256, size=(n, channels, h, w))
    images = pixels / 127.5 - 1
    labels = [2, 0, 2, 1, 0, 2, 2]
    rows = grid_rows(n, labels)
    mosaic = image_grid(images, rows, padding=PADDING)
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    assert n_rows == len(set(labels))
    assert mosaic.shape == (n_rows * h + (n_rows + 1) * PADDING, n_cols * w + (n_cols + 1) * PADDING, channels)
    covered = np.zeros(mosaic.shape[:2], bool)
    for r, row in enumerate(rows):
        for k, index in enumerate(row):
            top, left = PADDING + r * (h + PADDING), PADDING + k * (w + PADDING)
            np.testing.assert_array_equal(mosaic[top:top + h, left:left + w], pixels[index].transpose(1, 2, 0))
            covered[top:top + h, left:left + w] = True
    # Everything that is not an image — the padding and the empty cells of short rows — is padding.
    assert (mosaic[~covered] == PADDING_VALUE).all()
    assert covered.sum() == n * h * w


def test_conditional_grid_figure_labels_every_row_with_its_class():
    rng = np.random.default_rng(1)
    labels = np.arange(30) % 4                          # classes cycling, as training's samples.png
    images = rng.uniform(-1, 1, size=(30, 1, 8, 8))
    fig = figure_image_grid(images, labels, title="student, ema weights, 2 NFE, step 7")
    ax = fig.axes[0]
    rows = grid_rows(30, labels)
    assert len(rows) == 4
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    centres = ax.get_yticks()
    np.testing.assert_allclose(np.diff(centres), 8 + PADDING)     # one label per row, at the row's centre
    assert ax.get_ylabel() == "class" and ax.get_xlabel() == "samples"
    assert "step 7" in ax.get_title() and "30 samples" in ax.get_title()
    named = figure_image_grid(images, labels, class_names=["cat", "dog", "owl", "eel"]).axes[0]
    assert [t.get_text() for t in named.get_yticklabels()] == ["cat", "dog", "owl", "eel"]


def test_unconditional_grid_figure_has_no_row_labels_and_says_what_is_left_out():
    images = np.zeros((150, 3, 4, 4))
    ax = figure_image_grid(images, None, title="x", max_images=100).axes[0]
    assert len(ax.get_yticks()) == 0
    assert "100 of 150 samples" in ax.get_title()
    shown = ax.get_images()[0].get_array()
    assert shown.shape[:2] == (10 * 4 + 11 * PADDING, 10 * 4 + 11 * PADDING)   # ⌈√100⌉ = 10 per row


# ------------------------------------------------------------------------------------------------
# 2-D samples with the teacher overlaid


def test_2d_overlay_draws_both_series_on_one_square_equal_aspect_window():
    rng = np.random.default_rng(2)
    student = rng.normal(0, 0.3, size=(37, 2))
    teacher = rng.normal([2.0, -1.0], 0.5, size=(53, 2))
    fig = figure_samples_2d(student, teacher, title="t", sample_label="student (2 NFE)",
                            reference_label="teacher (exact samples)")
    ax = fig.axes[0]
    offsets = [c.get_offsets() for c in ax.collections]
    assert [len(o) for o in offsets] == [53, 37]          # teacher first (underneath), then the student
    np.testing.assert_array_equal(offsets[0], teacher)
    np.testing.assert_array_equal(offsets[1], student)
    colours = [tuple(c.get_facecolor()[0][:3]) for c in ax.collections]
    assert colours[0] != colours[1]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["teacher (exact samples) (n = 53)", "student (2 NFE) (n = 37)"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x₁", "x₂") and ax.get_aspect() == 1.0
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x1 - x0 == pytest.approx(y1 - y0)              # one scale for both coordinates
    both = np.concatenate([student, teacher])
    assert x0 < both[:, 0].min() and both[:, 0].max() < x1 and y0 < both[:, 1].min() and both[:, 1].max() < y1


# ------------------------------------------------------------------------------------------------
# A tiny training run: metrics.png with each checkpoint, the run's statistics, `apctl sample`'s picture

TINY = ["training.iterations=4", "training.batch_size=32", "training.log_every=1", "training.checkpoint_every=2",
        "training.eval_every=2", "precond.statistics.n_points=8", "precond.statistics.n_samples=256",
        "precond.statistics.batch_size=256", "eval.n_samples=64", "eval.teacher_steps=8", "run.threads=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from apctl.presets import load_config
    from apctl.training.run import alignment_probe, prepare, train

    cfg, _ = load_config("toy2d", TINY)
    run = prepare(cfg, tmp_path_factory.mktemp("plots") / "run")
    train(run, probe=alignment_probe(run))
    return run


def test_metrics_png_is_written_with_each_checkpoint_from_the_whole_log(tiny_run, tmp_path):
    from apctl.plots import save_figure

    run_dir = tiny_run.run_dir
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # It is the figure of the complete log as of the last checkpoint (step 4), not of an earlier one.
    fig = figure_metrics(rows, title=f"{tiny_run.cfg.run.name}, step 4")
    expected = save_figure(fig, tmp_path / "expected.png").read_bytes()
    np.testing.assert_array_equal(_pixels(png.read_bytes()), _pixels(expected))

    loss_ax, align_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert {"total loss", "CTM term", "DSM term (before λ)"} <= set(lines)
    np.testing.assert_array_equal(lines["total loss"].get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(lines["total loss"].get_ydata(), [r["loss"] for r in rows if "loss" in r])
    align = {line.get_label(): line for line in align_ax.get_lines()}
    assert set(align) == {"1 step (1 NFE)", "2 steps (2 NFE)"}
    np.testing.assert_array_equal(align["2 steps (2 NFE)"].get_xdata(), [0, 2, 4])
    np.testing.assert_allclose(align["2 steps (2 NFE)"].get_ydata(), [r["align_nfe2"] for r in rows if "align_nfe2" in r])
    assert align_ax.get_yscale() == "log"
    for ax in fig.axes:
        assert ax.get_xlabel() == "iteration" and ax.get_ylabel()


def test_metrics_figure_draws_isds_fm_and_sd_terms():
    """iSD logs its two terms as fm and sd (its total, ℓ/(ℓ + c) averaged, stays near 1): both are drawn, by name."""
    rows = [{"step": k, "loss": 0.95, "fm": 0.7 - 0.01 * k, "sd": 0.001 * k} for k in (1, 2, 3)]
    lines = {line.get_label(): line for line in figure_metrics(rows).axes[0].get_lines()}
    assert set(lines) == {"total loss", "FM term (diagonal)", "SD term (self-distillation)"}
    np.testing.assert_allclose(lines["SD term (self-distillation)"].get_ydata(), [0.001, 0.002, 0.003])


def test_metrics_figure_skips_a_line_cut_short_and_has_one_panel_without_alignment(tmp_path):
    from apctl.plots import write_metrics_figure

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"loss": 1.0 / k, "step": k}) + "\n" for k in (1, 2, 3)) + '{"loss": 0.2, "st')
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3]
    assert len(figure_metrics(read_metrics(log)).axes) == 1
    assert write_metrics_figure(log) == tmp_path / "metrics.png"
    assert (tmp_path / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    assert write_metrics_figure(tmp_path / "absent.jsonl") is None


def test_precond_figure_names_the_teacher_of_the_statistics_file(tiny_run):
    from apctl.preconditioning.report import figure_coefficients
    from apctl.preconditioning.statistics import load_statistics
    from apctl.schedules import karras_sigmas

    stats = load_statistics(tiny_run.run_dir / "precond_stats.safetensors")
    fingerprint = tiny_run.teacher.fingerprint()
    assert stats.teacher_fingerprint == fingerprint and stats.extras["teacher_source"] == "gmm"
    fig = figure_coefficients(stats, karras_sigmas(18), "backward", "precond_stats.safetensors")
    g_ax, f_ax = fig.axes[2], fig.axes[3]
    legend = [t.get_text() for t in g_ax.get_legend().get_texts()]
    assert legend[0] == f"Analytic-Precond (backward), teacher gmm ({fingerprint})"
    assert f"teacher gmm ({fingerprint})" in fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    for ax in (g_ax, f_ax):
        lines = ax.get_lines()[:3]                     # AP, CTM, CM (then the grid's verticals)
        assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 3
        # "identical to …" is said exactly of a curve equal to an earlier one.
        texts = [t.get_text() for t in ax.get_legend().get_texts()][:3]
        for i, (line, text) in enumerate(zip(lines, texts)):
            equal_earlier = [np.allclose(line.get_ydata(), other.get_ydata(), rtol=1e-9, atol=1e-12)
                             for other in lines[:i]]
            assert ("identical to" in text) == any(equal_earlier), text


def test_precond_figure_of_a_file_without_a_recorded_source_names_only_the_fingerprint(tiny_run):
    from apctl.preconditioning.report import teacher_name
    from apctl.preconditioning.statistics import load_statistics

    stats = load_statistics(tiny_run.run_dir / "precond_stats.safetensors")
    stats.extras.pop("teacher_source")
    assert teacher_name(stats) == stats.teacher_fingerprint


def test_sample_command_overlays_the_teacher_for_2d(tiny_run, tmp_path, monkeypatch):
    """`apctl sample` on the 2-D run: the picture holds the student's n samples and n exact teacher
    samples on one axes, and the .npz is the student's alone."""
    from typer.testing import CliRunner

    import apctl.plots
    from apctl.cli.main import app

    figures = []
    real_save = apctl.plots.save_figure
    monkeypatch.setattr(apctl.plots, "save_figure", lambda fig, path, **kw: (figures.append(fig), real_save(fig, path, **kw))[1])
    out = tmp_path / "s.npz"
    result = CliRunner().invoke(app, ["sample", "--ckpt", str(tiny_run.run_dir), "--n", "40", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    (fig,) = figures
    ax = fig.axes[0]
    teacher, student = (c.get_offsets() for c in ax.collections)
    assert len(teacher) == len(student) == 40
    np.testing.assert_allclose(student, data["samples"])
    # The toy2d teacher's exact samples lie on its ring: radius 0.7 around (0.3, −0.2), component std 0.08.
    radius = np.linalg.norm(np.asarray(teacher) - [0.3, -0.2], axis=1)
    assert np.abs(radius - 0.7).max() < 0.5 and 0.6 < np.median(radius) < 0.8
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["teacher (exact samples) (n = 40)", "student (2 NFE) (n = 40)"]
    assert "ema weights, step 4" in ax.get_title()

