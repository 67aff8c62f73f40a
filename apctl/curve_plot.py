"""The picture of `apctl eval curve`: a metric against training iterations, one panel per NFE, runs overlaid."""

from __future__ import annotations

import io
from pathlib import Path

from apctl.files import atomic_write

METRIC_NAMES = {"fid": "FID", "align": "alignment RMS vs teacher ODE"}


def plot_curves(points: list[dict], path: str | Path, metric: str, target: float | None = None) -> Path:
    """points: [{'label', 'step', 'nfe', 'value'}]; a dotted line marks `target`. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = sorted({p["nfe"] for p in points})
    labels = list(dict.fromkeys(p["label"] for p in points))
    fig, axes = plt.subplots(1, len(nfes), figsize=(5 * len(nfes), 3.8), squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        for i, label in enumerate(labels):
            pts = sorted((p["step"], p["value"]) for p in points if p["label"] == label and p["nfe"] == nfe)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, ls=("-", "--", ":", "-.")[i % 4], label=label)
        if target is not None:
            ax.axhline(target, color="0.5", lw=0.8, ls=":", label=f"target {target:g}")
        ax.set_xlabel("training iteration")
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)}, NFE {nfe}")
        ax.set_title(f"NFE {nfe}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    picture = io.BytesIO()
    fig.savefig(picture, format=Path(path).suffix[1:] or "png", dpi=110)
    plt.close(fig)
    return atomic_write(path, picture.getvalue())
