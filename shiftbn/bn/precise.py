"""PreciseBN: population statistics recomputed with the frozen model (Wu & Johnson 2021, Section 3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from shiftbn._forward import Forward
from shiftbn.bn.collect import CollectMode, CollectOptions, collect_stats
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import BNStats
from shiftbn.bn.state import load_stats
from shiftbn.data.items import ItemKeys


def precise_bn(
    model: nn.Module,
    data: Any,
    *,
    num_samples: int | None = 4096,
    batch_size: int = 64,
    mode: CollectMode = "batch",
    sampler: Iterable[list[int]] | None = None,
    seed: int = 0,
    fused: bool | None = None,
    keys: ItemKeys | None = None,
    progress: bool = True,
    forward: Forward | None = None,
) -> BNStats:
    """Recompute population BN statistics over ``num_samples`` samples and write them into the model.

    Why: the EMA in the BN buffers mixes statistics of many past versions of the model; the paper
    shows 10^3-10^4 samples through the frozen model give better population statistics.
    Unlike ``torch.optim.swa_utils.update_bn`` (which averages within-batch variances) and fvcore
    (E[x^2]-E[x]^2 in float32), the pooled variance is exact whatever the batch composition.
    ``data``: as for ``collect_stats`` (all sources pooled). Writes the BN buffers in place (the only
    change to the model; flags and momentum are restored) and returns the ``BNStats`` written.
    Holds the model's lock (``model_lock``) from collection to writing.
    Under ``torch.distributed`` (a DDP script): ``precise_bn(ddp_model.module, loader)`` with the
    training loader (its ``DistributedSampler`` gives each rank its shard) merges every rank's moments
    exactly, so every rank writes the same statistics, those of one process over all the batches
    (``num_samples`` is then a global cap). A Dataset given on every rank is sharded here.

    Args:
        model: the model; its BN buffers are overwritten.
        data: a Dataset or a re-iterable of batches, as for ``collect_stats``.
        num_samples: at most this many samples (default 4096; ``None``: all).
        batch_size: samples per batch (default 64).
        mode: ``"batch"`` (default), ``"sequential"`` or ``"eval"``, as for ``collect_stats``.
        sampler: index lists giving the batches of a Dataset (default: shuffled batches).
        seed: seeds the shuffle and the ``num_samples`` subset.
        fused: the kernel choice of ``CollectOptions.fused``.
        keys: field names of dict items or batches (MONAI, Hugging Face), as ``CollectOptions.keys``.
        progress: show a progress bar (default True).
        forward: ``forward(model, x)`` run on each batch instead of ``model(x)`` (multi-input models,
            sliding windows, micro-batches), as ``collect_stats``'s.

    Returns:
        The pooled ``BNStats`` written into the buffers.

    Raises:
        ValueError: bad arguments or no data reaching the BN layers (see ``collect_stats``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> stats = precise_bn(model, ds, num_samples=None, batch_size=16, progress=False)
        >>> stats.num_samples, np.allclose(model[1].running_mean.numpy(), stats["1"].mean)
        (60, True)
    """
    with model_lock(model):
        stats = collect_stats(model, data, batch_size=batch_size, by_source=False, num_samples=num_samples,
                              mode=mode, seed=seed, progress=progress, forward=forward,
                              options=CollectOptions(sampler=sampler, fused=fused, keys=keys)).pooled()
        load_stats(model, stats)
    return stats
