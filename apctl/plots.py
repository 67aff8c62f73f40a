"""Pictures for a report: sample grids, 2-D sample scatters with the teacher overlaid, training curves.

Each picture has a `figure_*` builder that returns a matplotlib `Figure` (built without pyplot, so no
global state and no display: tests inspect it) and a writer that renders it to a file atomically
(`save_figure`; a reader sees the old picture or the new one, never half of one).

* `figure_image_grid`: images in [-1, 1] as a mosaic with `padding` white pixels between cells;
  when labels are given, each row holds one class (a class with more samples than columns wraps
  onto further rows, each labelled), columns are samples; titled with what is shown.
* `figure_samples_2d`: the first two coordinates (x₁, x₂) of the samples and, on the same axes with
  the same square limits and equal aspect, the teacher's samples in another colour, with a legend
  giving each series' count.
* `figure_metrics`: the loss terms and the alignment RMS (1 and 2 steps) of `metrics.jsonl` against
  the iteration, log-scale y where every value is positive; `write_metrics_figure` puts it beside
  the log as `metrics.png`.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from apctl.files import atomic_write

PADDING = 2              # pixels between grid cells (and around the border)
PADDING_VALUE = 255      # white: black-background images (digits) stay visibly apart
MAX_GRID_IMAGES = 100    # a picture, not an archive: the .npz holds every sample

# metrics.jsonl keys drawn in the loss panel (the objectives' loss terms), with their legend text. CTM's
# total is L_CTM + λ·L_DSM, so the DSM curve (logged before λ) can sit above the total; iSD's total is the
# adaptively normalised mean of ℓ/(ℓ + c) (≈ 1), so its FM and SD terms are what move.
LOSS_TERMS = {"loss": "total loss", "ctm": "CTM term", "dsm": "DSM term (before λ)",
              "fm": "FM term (diagonal)", "sd": "SD term (self-distillation)"}
ALIGNMENT_KEYS = {"align_nfe1": "1 step (1 NFE)", "align_nfe2": "2 steps (2 NFE)"}


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, outside pyplot (nothing to close, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render `fig` in the format of `path`'s suffix (png if none) and write it atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:] or "png", dpi=dpi)
    atomic_write(path, buffer.getvalue())
    return path


# --- image grids -------------------------------------------------------------------------------


def grid_rows(n: int, labels: Sequence[int] | np.ndarray | None = None, columns: int | None = None) -> list[list[int]]:
    """Which sample goes in which row, as lists of indices into the n samples.

    Without labels: row-major, `columns` (default ⌈√n⌉) per row. With labels: the classes present in
    ascending order, each class's samples in their original order, `columns` per row (default the
    largest class count, but at least 8 and at most ⌈√n⌉ when that is larger, so one class does not
    make a single endless row); a class with more samples than that continues on the next row.
    """
    if labels is None:
        cols = columns or max(1, math.ceil(math.sqrt(n)))
        return [list(range(i, min(i + cols, n))) for i in range(0, n, cols)]
    labels = np.asarray(labels).reshape(-1)[:n]
    classes = sorted(set(labels.tolist()))
    members = {c: [i for i in range(n) if labels[i] == c] for c in classes}
    largest = max(len(m) for m in members.values())
    cols = columns or min(largest, max(8, math.ceil(math.sqrt(n))))
    return [members[c][i:i + cols] for c in classes for i in range(0, len(members[c]), cols)]


def image_grid(images: np.ndarray, rows: list[list[int]], padding: int = PADDING) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] and `grid_rows` → a (R·H + (R+1)·p, K·W + (K+1)·p, C) uint8 mosaic,
    R rows, K the longest row, p = `padding`: cell (r, k) (image rows[r][k]) has its top-left pixel at
    (p + r·(H + p), p + k·(W + p)); padding and empty cells are PADDING_VALUE."""
    images = np.clip((np.asarray(images, dtype=np.float64) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    _, channels, h, w = images.shape
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    mosaic = np.full((n_rows * h + (n_rows + 1) * padding, n_cols * w + (n_cols + 1) * padding, channels),
                     PADDING_VALUE, dtype=np.uint8)
    for r, row in enumerate(rows):
        for k, index in enumerate(row):
            top, left = padding + r * (h + padding), padding + k * (w + padding)
            mosaic[top:top + h, left:left + w] = images[index].transpose(1, 2, 0)
    return mosaic


def figure_image_grid(images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None, title: str = "",
                      class_names: Sequence[str] | None = None, max_images: int = MAX_GRID_IMAGES):
    """The first `max_images` images as a padded grid; with `labels` (class index per image) one class
    per row, the row labelled with its class name (`class_names[c]`) or index. The title says how many
    of how many are shown."""
    images = np.asarray(images)
    total = len(images)
    shown = min(total, max_images)
    rows = grid_rows(shown, None if labels is None else np.asarray(labels)[:shown])
    mosaic = image_grid(images[:shown], rows)
    h, w = images.shape[2:]
    cell = max(0.55, h / 64)                       # inches per cell: ≥ 55 px for small images
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = new_figure(1.2 + cell * n_cols, 0.9 + cell * n_rows)
    ax = fig.subplots()
    grey = mosaic.shape[-1] == 1
    ax.imshow(mosaic[..., 0] if grey else mosaic, cmap="gray" if grey else None, vmin=0, vmax=255,
              interpolation="nearest")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xticks([])
    if labels is None:
        ax.set_yticks([])
    else:
        label_of = np.asarray(labels)
        centres = [PADDING + r * (h + PADDING) + (h - 1) / 2 for r in range(n_rows)]
        names = [str(class_names[int(label_of[row[0]])]) if class_names else str(int(label_of[row[0]]))
                 for row in rows]
        ax.set_yticks(centres, names)
        ax.tick_params(axis="y", length=0)
        ax.set_ylabel("class")
        ax.set_xlabel("samples")
    count = f"{shown} of {total} samples" if shown < total else f"{total} samples"
    ax.set_title(f"{title}\n{count}" if title else count, fontsize=10)
    fig.tight_layout()
    return fig


# --- 2-D samples -------------------------------------------------------------------------------


def figure_samples_2d(samples: np.ndarray, reference: np.ndarray | None = None, title: str = "",
                      sample_label: str = "student", reference_label: str = "teacher"):
    """Scatter of the samples' (x₁, x₂) and, on the same axes, the teacher's `reference` samples
    (drawn first, in orange, so the samples lie on top); equal aspect and one square window holding
    both series; a legend with each series' count."""
    samples = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    fig = new_figure(6, 6.6)
    ax = fig.subplots()
    series = []
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
        series.append(reference)
        ax.scatter(reference[:, 0], reference[:, 1], s=4, c="C1", alpha=0.45, linewidths=0,
                   label=f"{reference_label} (n = {len(reference)})")
    series.append(samples)
    ax.scatter(samples[:, 0], samples[:, 1], s=4, c="C0", alpha=0.6, linewidths=0,
               label=f"{sample_label} (n = {len(samples)})")
    points = np.concatenate([s[:, :2] for s in series])
    points = points[np.isfinite(points).all(axis=1)]
    if len(points):
        low, high = points.min(axis=0), points.max(axis=0)
        centre, half = (low + high) / 2, max(float((high - low).max()) / 2, 1e-6) * 1.08
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.grid(alpha=0.25)
    # Below the axes, so the legend never hides a mode.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, markerscale=3, frameon=False, fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_samples(samples: np.ndarray, path: str | Path, reference: np.ndarray | None = None, title: str = "",
                 labels: Sequence[int] | np.ndarray | None = None, class_names: Sequence[str] | None = None,
                 sample_label: str = "student", reference_label: str = "teacher") -> Path:
    """Write the picture of `samples` to `path`: an image grid for (B, C, H, W) samples (class per row
    when `labels` are given), else the 2-D scatter with the teacher's `reference` samples overlaid."""
    samples = np.asarray(samples)
    if samples.ndim == 4:
        fig = figure_image_grid(samples, labels, title, class_names)
    else:
        fig = figure_samples_2d(samples, reference, title, sample_label, reference_label)
    return save_figure(fig, path)


# --- training curves ---------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash (not JSON) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _curve(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of the rows that carry a number under `key`."""
    points = np.array([(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))],
                      dtype=np.float64).reshape(-1, 2)
    return points[:, 0], points[:, 1]


def _log_if_positive(ax, values: list[np.ndarray]) -> None:
    finite = np.concatenate(values) if values else np.array([])
    finite = finite[np.isfinite(finite)]
    if len(finite) and (finite > 0).all():
        ax.set_yscale("log")


def figure_metrics(rows: list[dict], title: str = ""):
    """Loss terms (LOSS_TERMS) against the iteration, and, when the run measured it, the alignment RMS
    of the evaluation EMA with the teacher's ODE at 1 and 2 steps (ALIGNMENT_KEYS), side by side."""
    losses = {key: _curve(rows, key) for key in LOSS_TERMS}
    losses = {k: c for k, c in losses.items() if len(c[0])}
    alignment = {key: _curve(rows, key) for key in ALIGNMENT_KEYS}
    alignment = {k: c for k, c in alignment.items() if len(c[0])}
    panels = 1 + bool(alignment)
    fig = new_figure(5.2 * panels, 4)
    axes = np.atleast_1d(fig.subplots(1, panels))
    ax = axes[0]
    for (key, (steps, values)), style in zip(losses.items(), ("-", "--", ":")):
        ax.plot(steps, values, style, lw=1.4, label=LOSS_TERMS[key])
    _log_if_positive(ax, [v for _, v in losses.values()])
    ax.set(xlabel="iteration", ylabel="training loss (mean over the log interval)", title="loss")
    if not losses:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    if panels == 2:
        ax = axes[1]
        for (key, (steps, values)), (style, marker) in zip(alignment.items(), (("-", "o"), ("--", "s"))):
            ax.plot(steps, values, style, marker=marker, ms=4, lw=1.4, label=ALIGNMENT_KEYS[key])
        _log_if_positive(ax, [v for _, v in alignment.values()])
        ax.set(xlabel="iteration", ylabel="alignment RMS vs teacher ODE", title="alignment (evaluation EMA)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_metrics_figure(metrics_path: str | Path, title: str = "") -> Path | None:
    """Draw `metrics.jsonl` as `metrics.png` in the same folder (atomically); None, and nothing
    written, when there is no log yet."""
    metrics_path = Path(metrics_path)
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    if not rows:
        return None
    return save_figure(figure_metrics(rows, title), metrics_path.with_name("metrics.png"))
