"""Kernel Inception Distance (Bińkowski et al. 2018), with torch-fidelity's estimator.

    KID = MMD²_u(X, Y) with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³,
    MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(m(m−1)) − 2 Σ_{i,j} k(x_i, y_j)/m²,

averaged (mean and std) over `subsets` random subsets of m = `subset_size` rows of each set
(torch-fidelity's `kid_features_to_metric`, seed 2020). It needs the features of both sets, not
their statistics: a reference .npz carries them only when written by `apctl eval ref` (key `features`).
"""

from __future__ import annotations

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def kernel_inception_distance(features_1: np.ndarray, features_2: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE) -> dict[str, float]:
    """{'kid_mean', 'kid_std', 'kid_subset_size', 'kid_subsets'}; the subset size is capped by the smaller set."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    m = min(subset_size, len(features_1), len(features_2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(features_1)} and {len(features_2)}")
    out = kid_features_to_metric(torch.as_tensor(np.asarray(features_1, np.float64)),
                                 torch.as_tensor(np.asarray(features_2, np.float64)),
                                 kid_subsets=subsets, kid_subset_size=m, verbose=False)
    return {"kid_mean": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"],
            "kid_subset_size": m, "kid_subsets": subsets}
