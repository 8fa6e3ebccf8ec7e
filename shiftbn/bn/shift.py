"""Per-layer shift profiles: how far each source's BN statistics are from a reference."""

from __future__ import annotations

import numpy as np
import pandas as pd

from shiftbn.bn.moments import POOLED, BNStats, SourceStats
from shiftbn.bn.sites import split_site

METRICS = ("w2", "kl", "smd")
_EPS = 1e-5  # BN's default eps: keeps ratios finite for dead channels


def w2(mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """2-Wasserstein distance between per-channel Gaussians, averaged over the last axis (channels).

    ``sqrt((ma - mb)^2 + (sa - sb)^2)`` with ``s = sqrt(var + eps)``; arrays broadcast against each
    other, e.g. (B, C) batches against a (C,) reference -> (B,). Units: those of the activations; float64.
    """
    sa, sb = np.sqrt(np.asarray(var_a, np.float64) + _EPS), np.sqrt(np.asarray(var_b, np.float64) + _EPS)
    d2 = (np.asarray(mean_a, np.float64) - np.asarray(mean_b, np.float64)) ** 2
    return np.sqrt(d2 + (sa - sb) ** 2).mean(axis=-1)


def _distances(metric: str, ma: np.ndarray, va: np.ndarray, mb: np.ndarray, vb: np.ndarray) -> np.ndarray:
    """Channel-averaged distance between every row of ``a`` and every row of ``b``.

    ``ma``, ``va``: (A, C) means and variances; ``mb``, ``vb``: (B, C). Returns (A, B) float64.
    """
    if metric == "w2":  # 2-Wasserstein between 1-D Gaussians
        return w2(ma[:, None, :], va[:, None, :], mb[None, :, :], vb[None, :, :])
    va, vb = va[:, None, :] + _EPS, vb[None, :, :] + _EPS
    d2 = (ma[:, None, :] - mb[None, :, :]) ** 2
    if metric == "kl":  # symmetric KL (Jeffreys divergence)
        return (0.5 * ((va + d2) / vb + (vb + d2) / va) - 1.0).mean(axis=-1)
    return np.sqrt(d2 / (0.5 * (va + vb))).mean(axis=-1)  # standardized mean difference


def _stack(group: list[BNStats], layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the members holding ``layer`` and their (n, C) means and variances."""
    idx = np.array([i for i, bn in enumerate(group) if layer in bn.layers], dtype=np.int64)
    channels = {group[i].layers[layer].channels for i in idx}
    if len(channels) > 1:
        raise ValueError(f"layer {layer!r} has different channel counts {sorted(channels)} across statistics")
    if not len(idx):
        return idx, np.zeros((0, 0)), np.zeros((0, 0))
    return idx, np.stack([group[i].layers[layer].mean for i in idx]), np.stack([group[i].layers[layer].var
                                                                                 for i in idx])


def _source_block(s: int, bn: BNStats, refs: dict[str, tuple], ref_has: np.ndarray, lidx: dict[str, int],
                  metrics: list[str], pairwise: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of one source in (reference, the source's layer order, metric) order.

    Returns reference codes, layer codes (one per (reference, layer) pair) and values (pairs, metrics).
    """
    names = list(bn.layers)
    js = np.array([lidx[n] for n in names], dtype=np.int64)
    has = ref_has[:, js]
    if pairwise:
        has[s] = False
    vals = np.zeros((len(ref_has), len(names), len(metrics)))
    for j, name in enumerate(names):
        ri, mr, vr = refs[name]
        mom = bn.layers[name]
        if not len(ri):
            continue
        if mr.shape[1] != mom.channels:
            raise ValueError(f"layer {name!r} has {mom.channels} channels in one source and {mr.shape[1]} in "
                             "its reference")
        for k, m in enumerate(metrics):
            vals[ri, j, k] = _distances(m, mom.mean[None], mom.var[None], mr, vr)[0]
    r_rows, j_rows = np.nonzero(has)  # row-major: references in order, then the source's layer order
    return r_rows.astype(np.int32), js[j_rows].astype(np.int32), vals[r_rows, j_rows]


def stats_shift(
    stats: SourceStats, reference: str | None = None, metric: str | list[str] = "w2"
) -> pd.DataFrame:
    """Channel-averaged distance between each source's statistics and a reference, per BN layer.

    Why: the layer profile shows where a lab's shift enters the network (input intensity shows in the
    first layers; content shifts deeper). ``reference``: ``None`` = pooled statistics of all sources,
    a source name, or ``"pairwise"`` for every ordered pair. ``metric``: ``"w2"`` (2-Wasserstein
    between per-channel Gaussians, activation units), ``"kl"`` (symmetric KL), ``"smd"``
    (standardized mean difference), a list of them or ``"all"``.
    Returns a tidy DataFrame: ``layer, depth, source, reference, metric, value`` (rows ordered by
    source, reference, the source's layer order, metric). Computed per source against all references
    at once into integer codes and float arrays, the string columns built one at a time: memory
    follows the size of the table (``"pairwise"`` at 300 sources too), no Python object per row.

    Args:
        stats: per-source statistics (``collect_stats``).
        reference: ``None`` (pooled), a source name or ``"pairwise"``.
        metric: ``"w2"`` (default), ``"kl"``, ``"smd"``, a list of them or ``"all"``.

    Returns:
        A ``pandas.DataFrame`` with columns ``layer, depth, source, reference, metric, value``.

    Raises:
        ValueError: an unknown metric or reference, empty ``stats``, or channel counts that differ.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> stats = collect_stats(model, sb.load("blobs-labs", n=60, n_features=4), progress=False)
        >>> df = stats_shift(stats, metric=["w2", "smd"])
        >>> len(df), sorted(df["metric"].unique()), df["reference"].unique().tolist()
        (8, ['smd', 'w2'], ['pooled'])
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
    src_names, srcs = list(stats), list(stats.values())
    ref_names, ref_list = list(refs), list(refs.values())
    depth: dict[str, int] = {}
    lidx: dict[str, int] = {}
    for bn in srcs:
        for layer in bn.layers:
            depth.setdefault(split_site(layer)[0], len(depth))
            lidx.setdefault(layer, len(lidx))
    ref_has = np.zeros((len(ref_list), len(lidx)), dtype=bool)
    for r, bn in enumerate(ref_list):
        ref_has[r, [lidx[k] for k in bn.layers if k in lidx]] = True
    ref_stacks = {layer: _stack(ref_list, layer) for layer in lidx}
    blocks = [_source_block(s, bn, ref_stacks, ref_has, lidx, metrics, reference == "pairwise")
              for s, bn in enumerate(srcs)]
    return _frame(blocks, src_names, ref_names, list(lidx), metrics, depth)


def _column(names: list[str], codes: np.ndarray) -> pd.Series:
    """A string column from integer codes, built one column at a time to keep memory low."""
    objs = np.empty(len(names), dtype=object)
    objs[:] = names
    return pd.Series(objs[codes], copy=False)


def _frame(blocks: list, src_names: list[str], ref_names: list[str], layer_names: list[str],
           metrics: list[str], depth: dict[str, int]) -> pd.DataFrame:
    """The tidy table from per-source blocks (codes and values), one column at a time."""
    k = len(metrics)
    per_source = np.array([len(b[0]) for b in blocks], dtype=np.int64)
    n = int(per_source.sum())
    value = np.concatenate([np.zeros(0)] + [b[2].reshape(-1) for b in blocks])
    ref_codes = np.repeat(np.concatenate([np.zeros(0, np.int32)] + [b[0] for b in blocks]), k)
    layer_codes = np.repeat(np.concatenate([np.zeros(0, np.int32)] + [b[1] for b in blocks]), k)
    layer_depth = np.array([depth[split_site(name)[0]] for name in layer_names], dtype=np.int64)
    cols = {
        "layer": _column(layer_names, layer_codes),
        "depth": pd.Series(layer_depth[layer_codes], copy=False),
        "source": _column(src_names, np.repeat(np.arange(len(src_names)), per_source * k)),
        "reference": _column(ref_names, ref_codes),
        "metric": _column(metrics, np.tile(np.arange(k), n)),
        "value": pd.Series(value, copy=False),
    }
    return pd.DataFrame(cols, copy=False)
