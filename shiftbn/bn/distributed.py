"""Exact merging of statistics across ``torch.distributed`` ranks, with errors shared by every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from shiftbn.bn.moments import BNStats, SourceStats

# exception types re-raised as themselves on every rank; anything else becomes a RuntimeError
_KNOWN_ERRORS = {e.__name__: e for e in (ValueError, TypeError, FloatingPointError, RuntimeError, KeyError,
                                         IndexError, ZeroDivisionError, OverflowError)}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _merge_dicts(dicts: list[dict[str, Any]], mode: str, passes: int) -> SourceStats:
    """Merge ``SourceStats.to_dict`` payloads exactly (Chan), in rank order."""
    merged: dict[str, BNStats] = {}
    for d in dicts:
        for src, bn in SourceStats.from_dict(d).items():
            merged[src] = merged[src].merge(bn) if src in merged else bn
    return SourceStats(merged, mode, passes)


def all_merge(stats: SourceStats) -> SourceStats:
    """Merge every rank's per-source moments exactly (Chan), in rank order, on every rank.

    Why: with data sharded across processes each rank sees part of each source; the merged moments
    equal those of one process over all the data. A no-op without an initialized process group.
    """
    if _world() == 1:
        return stats
    gathered: list = [None] * _world()
    dist.all_gather_object(gathered, stats.to_dict())
    return _merge_dicts(gathered, stats.mode, stats.passes)


class RankSync:
    """Runs one step on every rank and agrees on the outcome: all ranks succeed or all raise.

    Why: a rank that raises before a collective leaves its peers waiting (or dying with gloo
    "connection closed"); here each step ends with one ``all_gather_object`` of either the result or
    the error, so every rank raises the same error (type, ``rank r: message``) in bounded time.
    Without an initialized process group (or with one rank) steps just run.
    """

    def __init__(self) -> None:
        self.world = _world()
        self.rank = dist.get_rank() if self.world > 1 else 0

    def _gather(self, fn: Callable[[], Any], pack: Callable[[Any], Any]) -> tuple[Any, list[Any]]:
        error: Exception | None = None
        result = None
        try:
            result = fn()
            payload: dict[str, Any] = {"ok": True, "data": pack(result)}
        except Exception as exc:  # shared with every rank below, then raised on all of them
            error = exc
            payload = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, payload)
        failed = [(r, p) for r, p in enumerate(gathered) if not p["ok"]]
        if failed:
            r, p = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            exc_type = _KNOWN_ERRORS.get(p["type"], RuntimeError)
            raise exc_type(f"rank {r} of {self.world}{more}: {p['type']}: {p['message']}") from error
        return result, [p["data"] for p in gathered]

    def check(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` here; raises on every rank if it raised on any."""
        if self.world == 1:
            return fn()
        return self._gather(fn, lambda _: None)[0]

    def merge(self, fn: Callable[[], tuple[SourceStats, dict[str, Any]]]) -> tuple[SourceStats, list[dict]]:
        """Run ``fn() -> (stats, info)`` here and merge every rank's stats exactly, in rank order.

        Returns the merged ``SourceStats`` and every rank's ``info`` (a small picklable dict).
        """
        if self.world == 1:
            stats, info = fn()
            return stats, [info]
        local, data = self._gather(fn, lambda res: (res[0].to_dict(), res[1]))
        return _merge_dicts([d for d, _ in data], local[0].mode, local[0].passes), [i for _, i in data]
