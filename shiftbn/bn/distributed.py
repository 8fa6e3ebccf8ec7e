"""Exact merging of statistics across ``torch.distributed`` ranks."""

from __future__ import annotations

import torch.distributed as dist

from shiftbn.bn.moments import BNStats, SourceStats


def all_merge(stats: SourceStats) -> SourceStats:
    """Merge every rank's per-source moments exactly (Chan), in rank order, on every rank.

    Why: with data sharded across processes each rank sees part of each source; the merged moments
    equal those of one process over all the data. A no-op without an initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats.to_dict())
    merged: dict[str, BNStats] = {}
    for d in gathered:
        for src, bn in SourceStats.from_dict(d).items():
            merged[src] = merged[src].merge(bn) if src in merged else bn
    return SourceStats(merged, stats.mode, stats.passes)
