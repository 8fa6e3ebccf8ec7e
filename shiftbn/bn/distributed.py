"""Exact merging of statistics across ``torch.distributed`` ranks, with errors shared by every rank.

Why: every verb runs unchanged under ``torchrun``: data is sharded by whole batches, moments are
merged exactly (Chan, float64) and every rank ends with the same result. ``solo()`` runs a block as
one process although a group is initialized (one study cell on one rank).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from shiftbn.bn.moments import BNStats, Moments, SourceStats

# exception types re-raised as themselves on every rank; anything else becomes a RuntimeError
_KNOWN_ERRORS = {e.__name__: e for e in (ValueError, TypeError, FloatingPointError, RuntimeError, KeyError,
                                         IndexError, ZeroDivisionError, OverflowError)}
_local = threading.local()


class PeerLostError(RuntimeError):
    """A collective failed: another rank died, hung past the group's timeout, or left the job.

    Why: a lost peer must say so in one line on the ranks still alive, not hang or show gloo's text.

    Args:
        *args: the message, as for any exception.

    Returns:
        A ``PeerLostError`` (a ``RuntimeError``), raised by shiftbn's collectives.

    Example:
        >>> err = PeerLostError("lost contact with the other ranks")
        >>> isinstance(err, RuntimeError), str(err)
        (True, 'lost contact with the other ranks')
    """


@contextmanager
def solo() -> Iterator[None]:
    """Inside the block this process computes alone, as without a process group (no collectives).

    Why: a study cell or a matrix cell owned by one rank must not wait for the others.

    Args:
        None.

    Returns:
        A context manager; inside it ``world_and_rank()`` is ``(1, 0)``. Blocks nest.

    Example:
        >>> with solo():
        ...     world_and_rank()
        (1, 0)
    """
    depth = getattr(_local, "solo", 0)
    _local.solo = depth + 1
    try:
        yield
    finally:
        _local.solo = depth


def _world() -> int:
    if getattr(_local, "solo", 0) or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def world_and_rank() -> tuple[int, int]:
    """``(world size, rank)`` of the initialized process group; ``(1, 0)`` without one or in ``solo()``.

    Why: every verb shards its data and merges its results by this, so the same code runs alone
    and under ``torchrun``.

    Args:
        None.

    Returns:
        ``(world, rank)`` ints.

    Example:
        >>> world_and_rank()  # a single process
        (1, 0)
    """
    world = _world()
    return world, (dist.get_rank() if world > 1 else 0)


def _all_gather(payload: Any, world: int, what: str) -> list[Any]:
    """``all_gather_object`` whose failure (a dead or hung peer) says so in one line."""
    gathered: list = [None] * world
    try:
        dist.all_gather_object(gathered, payload)
    except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        raise PeerLostError(
            f"lost contact with the other ranks while {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
            "a rank died, was killed or hung past the process group's timeout; see that rank's own error"
        ) from exc
    return gathered


def _pack(stats: SourceStats) -> dict[str, Any]:
    """Compact picklable moments (float64 arrays, not lists): what one all-gather moves per rank."""
    return {src: (bn.num_samples, {k: (m.count, np.asarray(m.mean, np.float64), np.asarray(m.m2, np.float64))
                                   for k, m in bn.layers.items()})
            for src, bn in stats.items()}


def _merge_packed(packs: list[dict[str, Any]], mode: str, passes: int) -> SourceStats:
    """Merge every rank's packed moments exactly (Chan), in rank order."""
    merged: dict[str, BNStats] = {}
    for pack in packs:
        for src, (n, layers) in pack.items():
            bn = BNStats({k: Moments(c, mean, m2) for k, (c, mean, m2) in layers.items()}, n)
            merged[src] = merged[src].merge(bn) if src in merged else bn
    return SourceStats(merged, mode, passes)


def all_merge(stats: SourceStats) -> SourceStats:
    """Merge every rank's per-source moments exactly (Chan), in rank order, on every rank.

    Why: with data sharded across processes each rank sees part of each source; the merged moments
    equal those of one process over all the data. A no-op without an initialized process group.
    Moves layers x channels x sources x 2 float64 (+ counts) per rank in one all-gather.

    Args:
        stats: this rank's ``SourceStats``.

    Returns:
        The merged ``SourceStats``, the same on every rank (``stats`` itself in one process).

    Raises:
        PeerLostError: another rank died or hung during the all-gather.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> stats = collect_stats(model, sb.load("blobs-labs", n=60, n_features=4), progress=False)
        >>> all_merge(stats) is stats  # no process group: nothing to merge
        True
    """
    world = _world()
    if world == 1:
        return stats
    return _merge_packed(_all_gather(_pack(stats), world, "merging statistics"), stats.mode, stats.passes)


class RankSync:
    """Runs one step on every rank and agrees on the outcome: all ranks succeed or all raise.

    Why: a rank that raises before a collective leaves its peers waiting (or dying with gloo
    "connection closed"); here each step ends with one ``all_gather_object`` of either the result or
    the error, so every rank raises the same error (type, ``rank r: message``) in bounded time.
    A rank that dies makes the others raise ``PeerLostError`` (at once, or after the group's timeout).
    Without an initialized process group (or with one rank, or in ``solo()``) steps just run.
    Errors raised here carry ``shared_by_ranks = True`` (every rank raises the same one).
    """

    def __init__(self) -> None:
        self.world, self.rank = world_and_rank()

    def _gather(self, fn: Callable[[], Any], pack: Callable[[Any], Any], what: str = "sharing a step's outcome"
                ) -> tuple[Any, list[Any]]:
        error: Exception | None = None
        result = None
        try:
            result = fn()
            payload: dict[str, Any] = {"ok": True, "data": pack(result)}
        except PeerLostError:
            raise  # the group is broken: no collective can agree on anything any more
        except Exception as exc:  # shared with every rank below, then raised on all of them
            error = exc
            payload = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
        gathered = _all_gather(payload, self.world, what)
        failed = [(r, p) for r, p in enumerate(gathered) if not p["ok"]]
        if failed:
            r, p = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            exc_type = _KNOWN_ERRORS.get(p["type"], RuntimeError)
            shared = exc_type(f"rank {r} of {self.world}{more}: {p['type']}: {p['message']}")
            shared.shared_by_ranks = True
            raise shared from error
        return result, [p["data"] for p in gathered]

    def check(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` here; raises on every rank if it raised on any."""
        if self.world == 1:
            return fn()
        return self._gather(fn, lambda _: None)[0]

    def gather(self, fn: Callable[[], Any]) -> list[Any]:
        """Every rank's ``fn()`` (picklable), in rank order, on every rank; raises on all if any raised."""
        if self.world == 1:
            return [fn()]
        return self._gather(fn, lambda res: res)[1]

    def merge(self, fn: Callable[[], tuple[SourceStats, dict[str, Any]]]) -> tuple[SourceStats, list[dict]]:
        """Run ``fn() -> (stats, info)`` here and merge every rank's stats exactly, in rank order.

        Returns the merged ``SourceStats`` and every rank's ``info`` (a small picklable dict).
        """
        if self.world == 1:
            stats, info = fn()
            return stats, [info]
        local, data = self._gather(fn, lambda res: (_pack(res[0]), res[1]), "merging statistics")
        return _merge_packed([d for d, _ in data], local[0].mode, local[0].passes), [i for _, i in data]


def _digest_item(item: Any, h: Any) -> None:
    """Feed the tensors and numbers of one dataset item into the hash ``h``."""
    if isinstance(item, torch.Tensor):
        h.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()[: 1 << 20])
    elif isinstance(item, np.ndarray):
        h.update(np.ascontiguousarray(item).tobytes()[: 1 << 20])
    elif isinstance(item, dict):
        for k in sorted(item, key=str):
            h.update(str(k).encode())
            _digest_item(item[k], h)
    elif isinstance(item, (tuple, list)):
        for v in item:
            _digest_item(v, h)
    elif item is None or isinstance(item, (bool, int, float, str, bytes)):
        h.update(repr(item).encode()[:256])
    else:  # an object's repr may hold its address, which differs between processes
        h.update(type(item).__qualname__.encode())


def _data_digest(data: Any, batches: list[list[int]] | None) -> str | None:
    """What identifies a map-style dataset (and a sampler's batches) across ranks; ``None`` otherwise.

    Length, type, source ids (when tagged), the first item's bytes, the batches: equal digests mean
    every rank holds the same data, so the verb shards it; a per-rank dataset is each rank's own.
    """
    if not (isinstance(data, Dataset) and hasattr(data, "__len__")):
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(data).__qualname__}:{len(data)}".encode())
    ids = getattr(data, "source_ids", None)
    if ids is not None:
        h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        h.update(repr(list(getattr(data, "source_names", []))).encode())
    if len(data):
        first = batches[0][0] if batches else 0
        _digest_item(data[first], h)
    if batches is not None:
        h.update(repr(batches).encode())
    return h.hexdigest()


def plan_shard(data: Any, sampler: Iterable[list[int]] | None, sync: RankSync
               ) -> tuple[tuple[int, int] | None, list[list[int]] | None]:
    """Whether this rank takes a share of ``data``'s batches: ``((world, rank) or None, sampler's batches)``.

    A map-style dataset (and sampler, if any) that is the same on every rank is sharded by whole
    batches: rank r takes batches r, r + W, ... of the plan one process would make. Iterables of
    batches (a ``DataLoader`` with a ``DistributedSampler``) and per-rank datasets are each rank's own.
    The sampler is read once here (a random sampler must give the same batches to planning).
    """
    def local() -> tuple[str | None, list[list[int]] | None]:
        batches = None if sampler is None else [[int(i) for i in b] for b in sampler]
        return (_data_digest(data, batches) if sync.world > 1 else None), batches

    if sync.world == 1:
        return None, local()[1]
    mine: list = []

    def run() -> str | None:
        mine.append(local())
        return mine[0][0]

    digests = sync.gather(run)
    same = digests[0] is not None and all(d == digests[0] for d in digests)
    return ((sync.world, sync.rank) if same else None), mine[0][1]
