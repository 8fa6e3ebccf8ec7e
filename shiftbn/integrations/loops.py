"""``refresh_bn``: PreciseBN statistics and the drift of the running statistics, for a training loop.

Why: the EMA in BN's buffers trails the weights it was computed under; recomputing the population
statistics before each validation (Wu & Johnson 2021) evaluates the model the weights define, and how
far the EMA was from them (per source) says how stale it had become. Plain PyTorch: call it at the
end of an epoch; Lightning users get the same through ``PreciseBNCallback``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shiftbn.bn import (
    BNStats,
    CollectOptions,
    SourceStats,
    buffer_stats,
    collect_stats,
    model_lock,
    precise_bn,
    stats_shift,
)
from shiftbn.data.items import ItemKeys

RUNNING = "running"
"""The reference name of the model's running statistics in ``BNRefresh.drift``."""


@dataclass
class BNRefresh:
    """What ``refresh_bn`` did: the statistics it wrote and the drift of the ones it replaced.

    ``stats``: the PreciseBN statistics now in the model's BN buffers (``None`` when ``precise=False``).
    ``drift``: tidy ``source, layer, depth, metric, value``: per source and BN layer, the channel-averaged
    distance between the running statistics the model had and the statistics of that layer's input
    when the model runs with them (empty when ``drift=False``).
    """

    stats: BNStats | None
    drift: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """One row per source and metric: ``source, metric, mean, max, worst_layer`` over the BN layers."""
        cols = ["source", "metric", "mean", "max", "worst_layer"]
        if self.drift.empty:
            return pd.DataFrame(columns=cols)
        g = self.drift.groupby(["source", "metric"], sort=False)["value"]
        out = g.agg(["mean", "max"]).reset_index()
        out["worst_layer"] = self.drift.loc[g.idxmax().to_numpy(), "layer"].to_numpy()
        return out[cols]

    def metrics(self, prefix: str = "bn_drift") -> dict[str, float]:
        """Flat ``{"<prefix>/<source>": mean drift over layers}`` for a logger (the first metric's values;
        ``"<prefix>/<source>/<metric>"`` when several metrics were measured)."""
        summary = self.summary()
        several = summary["metric"].nunique() > 1
        return {f"{prefix}/{r.source}" + (f"/{r.metric}" if several else ""): float(r.mean)
                for r in summary.itertuples()}


def refresh_bn(
    model: nn.Module,
    data: Any,
    *,
    num_samples: int | None = 4096,
    batch_size: int | None = None,
    keys: ItemKeys | None = None,
    precise: bool = True,
    drift: bool = True,
    metric: str | list[str] = "w2",
    seed: int = 0,
    progress: bool = False,
) -> BNRefresh:
    """Measure how stale the running BN statistics are (per source), then recompute them (PreciseBN).

    Why: call it before validating (e.g. at the end of each epoch of a custom loop) so validation
    sees the population statistics of the current weights, and log ``result.metrics()`` to watch the EMA.
    ``data``: the training data: a ``SourceTaggedDataset`` (drift per source), another Dataset, or a
    ``DataLoader`` (its dataset is used, in batches of its ``batch_size``, when it is map-style; else
    its batches as they come, pooled unless each batch holds one source). ``num_samples``: at most this
    many samples per source for the drift and in total for PreciseBN (``None``: all). ``batch_size``:
    default the loader's, else 64 (PreciseBN's statistics depend on it: use the training batch size).
    ``keys``: field names of dict items (MONAI, Hugging Face). ``metric``: as for ``stats_shift``.
    Writes the BN buffers (``running_mean``/``running_var``) when ``precise``, and nothing else:
    train/eval modes, every other buffer and torch's global random state are as they were.
    Example:
        >>> for epoch in range(epochs):
        ...     train_one_epoch(model, loader)
        ...     result = refresh_bn(model, loader, num_samples=2048)
        ...     print(result.summary()); validate(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data, batch_size = _dataset_of(data, batch_size)
    modes = [(m, m.training) for m in model.modules()]
    table = pd.DataFrame(columns=["source", "layer", "depth", "metric", "value"])
    stats = None
    try:
        with model_lock(model), torch.random.fork_rng(devices=[]):
            if drift:
                table = _drift(model, data, num_samples, batch_size, keys, metric, seed, progress)
            if precise:
                stats = precise_bn(model, data, num_samples=num_samples, batch_size=batch_size, seed=seed, keys=keys,
                                   progress=progress)
    finally:
        for m, training in modes:
            m.training = training
    return BNRefresh(stats, table)


def _dataset_of(data: Any, batch_size: int | None) -> tuple[Any, int]:
    """A map-style loader's dataset (so batches are planned per source), and the batch size to use."""
    if isinstance(data, DataLoader):
        if batch_size is None:
            batch_size = data.batch_size or 64
        if isinstance(data.dataset, Dataset) and hasattr(data.dataset, "__len__") and \
                not isinstance(data.dataset, torch.utils.data.IterableDataset):
            data = data.dataset
    return data, 64 if batch_size is None else batch_size


def _drift(model, data, num_samples, batch_size, keys, metric, seed, progress) -> pd.DataFrame:
    """Per source and layer: running statistics vs the statistics of the inputs they normalize."""
    running = buffer_stats(model)
    seen = collect_stats(model, data, batch_size=batch_size, by_source=True, num_samples=num_samples, mode="eval",
                         seed=seed, progress=progress, options=CollectOptions(keys=keys))
    ref = RUNNING
    while ref in seen:
        ref = f"_{ref}_"
    both = SourceStats({**seen.sources, ref: running}, mode="eval")
    table = stats_shift(both, reference=ref, metric=metric)
    table = table[table["source"] != ref].drop(columns="reference").reset_index(drop=True)
    return table[["source", "layer", "depth", "metric", "value"]]
