"""``recalibrate``: write a target site's (or all data's) BN statistics into a model."""

from __future__ import annotations

from typing import Literal

from torch import nn

from shiftbn._forward import Forward
from shiftbn.bn import BNStats, collect_stats, load_stats
from shiftbn.data.tagged import SourceTaggedDataset, require_tagged

RecalibrationMethod = Literal["target", "precise"]


def recalibrate(
    model: nn.Module,
    data: SourceTaggedDataset,
    *,
    target: str | None = None,
    method: RecalibrationMethod = "target",
    batch_size: int = 64,
    num_samples: int | None = None,
    seed: int = 0,
    amp: bool = False,
    progress: bool = True,
    forward: Forward | None = None,
) -> BNStats:
    """Recompute BN statistics and write them into ``model``'s buffers (in place); returns them.

    Why: a model headed for one site runs best with that site's statistics (AdaBN); PreciseBN
    replaces a stale EMA with exact population statistics.

    Args:
        model: the network; only its BN ``running_mean``/``running_var`` change.
        data: a ``SourceTaggedDataset`` of unlabeled samples.
        target: the site whose statistics to use; required for ``method="target"``; for
            ``"precise"`` it restricts the data to that site (default: all sources pooled).
        method: ``"target"`` (AdaBN: the site's own statistics, seen in single-site batches) or
            ``"precise"`` (PreciseBN over the data in random batches).
        batch_size, num_samples, seed, amp, progress, forward: as for ``collect_stats`` (``num_samples``
            per source; ``forward(model, x)`` runs each batch instead of ``model(x)``).
    """
    if method not in ("target", "precise"):
        raise ValueError(f"unknown method {method!r}; use 'target' (AdaBN on one site) or 'precise' (PreciseBN)")
    require_tagged(data, "recalibrate")
    if method == "target":
        if target is None:
            raise ValueError(f"method='target' needs target=, one of {data.sources_present}")
        stats = collect_stats(model, data.subset(target), batch_size=batch_size, num_samples=num_samples,
                              seed=seed, amp=amp, progress=progress, forward=forward)[str(target)]
    else:
        subset = data if target is None else data.subset(target)
        stats = collect_stats(model, subset, by_source=False, batch_size=batch_size, num_samples=num_samples,
                              seed=seed, amp=amp, progress=progress, forward=forward).pooled()
    load_stats(model, stats)
    return stats
