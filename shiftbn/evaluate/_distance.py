"""The 2-Wasserstein distance between per-channel Gaussians, channel-averaged (as ``stats_shift``'s ``w2``)."""

from __future__ import annotations

import numpy as np

_EPS = 1e-5  # BN's default eps, as in shiftbn.bn.shift: dead channels stay finite


def w2(mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """Mean over the last axis (channels) of ``sqrt((ma - mb)^2 + (sa - sb)^2)``, s = sqrt(var + eps).

    Arrays broadcast against each other, e.g. (B, C) batches against a (C,) reference -> (B,).
    Units: those of the activations. float64.
    """
    sa, sb = np.sqrt(np.asarray(var_a, np.float64) + _EPS), np.sqrt(np.asarray(var_b, np.float64) + _EPS)
    d2 = (np.asarray(mean_a, np.float64) - np.asarray(mean_b, np.float64)) ** 2
    return np.sqrt(d2 + (sa - sb) ** 2).mean(axis=-1)
