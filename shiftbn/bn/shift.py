"""Per-layer shift profiles: how far each source's BN statistics are from a reference."""

from __future__ import annotations

import numpy as np
import pandas as pd

from shiftbn.bn.moments import POOLED, BNStats, SourceStats
from shiftbn.bn.sites import split_site

METRICS = ("w2", "kl", "smd")
_EPS = 1e-5  # BN's default eps: keeps ratios finite for dead channels


def _distance(metric: str, a, b) -> float:
    va, vb = a.var + _EPS, b.var + _EPS
    d2 = (a.mean - b.mean) ** 2
    if metric == "w2":  # 2-Wasserstein between 1-D Gaussians
        val = np.sqrt(d2 + (np.sqrt(va) - np.sqrt(vb)) ** 2)
    elif metric == "kl":  # symmetric KL (Jeffreys divergence)
        val = 0.5 * ((va + d2) / vb + (vb + d2) / va) - 1.0
    else:  # standardized mean difference
        val = np.sqrt(d2 / (0.5 * (va + vb)))
    return float(np.mean(val))


def stats_shift(
    stats: SourceStats, reference: str | None = None, metric: str | list[str] = "w2"
) -> pd.DataFrame:
    """Channel-averaged distance between each source's statistics and a reference, per BN layer.

    Why: the layer profile shows where a lab's shift enters the network (input intensity shows in the
    first layers; content shifts deeper). ``reference``: ``None`` = pooled statistics of all sources,
    a source name, or ``"pairwise"`` for every ordered pair. ``metric``: ``"w2"`` (2-Wasserstein
    between per-channel Gaussians, activation units), ``"kl"`` (symmetric KL), ``"smd"``
    (standardized mean difference), a list of them or ``"all"``.
    Returns a tidy DataFrame: ``layer, depth, source, reference, metric, value``.
    """
    metrics = list(METRICS) if metric == "all" else [metric] if isinstance(metric, str) else list(metric)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; choose from {METRICS} or 'all'")
    if len(stats) == 0:
        raise ValueError("stats holds no source")
    if reference is None:
        refs: dict[str, BNStats] = {POOLED: stats.pooled()}
    elif reference == "pairwise":
        refs = dict(stats.items())
    elif str(reference) in stats:
        refs = {str(reference): stats[reference]}
    else:
        raise ValueError(f"unknown reference {reference!r}; use None, 'pairwise' or one of {list(stats)}")
    depth: dict[str, int] = {}
    for bn in stats.values():
        for layer in bn.layers:
            depth.setdefault(split_site(layer)[0], len(depth))
    rows = []
    for src, bn in stats.items():
        for ref_name, ref in refs.items():
            if reference == "pairwise" and ref_name == src:
                continue
            for layer, mom in bn.layers.items():
                if layer not in ref.layers:
                    continue
                for m in metrics:
                    rows.append((layer, depth[split_site(layer)[0]], src, ref_name, m,
                                 _distance(m, mom, ref.layers[layer])))
    return pd.DataFrame(rows, columns=["layer", "depth", "source", "reference", "metric", "value"])
