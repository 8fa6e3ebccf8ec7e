"""Planning the input batches of ``collect_stats``: source tags, per-source caps, rank shares."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shiftbn._torch import LenChecked
from shiftbn.bn.moments import POOLED
from shiftbn.data._checks import check_dataset
from shiftbn.data.items import ABSENT, DEFAULT_KEYS, ItemKeys, parts_of
from shiftbn.data.tagged import SourceTaggedDataset

WRAP = ("wrap it: TensorDataset(x) for pooled statistics (by_source=False), SourceTaggedDataset(TensorDataset(x, y), "
        "sources) for per-source ones, or pass a DataLoader or a list of batches [x1, x2, ...]")


class Batches:
    """A re-iterable plan of input batches, each tagged with its source name.

    ``cap``: keep the first ``cap`` samples per source, exactly: the batch that reaches it is cut, and a
    cut that would be smaller than ``min_batch`` (one sample, which has no batch statistics) joins the
    source's previous batch instead, held back until then (tensor inputs; others drop such a cut).
    ``keys``: how dict batches are read (``ItemKeys``).
    """

    def __init__(self, loader: Iterable[Any], names: list[str] | None, by_source: bool,
                 cap: int | None, total: int | None, min_batch: int = 1, keys: ItemKeys = DEFAULT_KEYS) -> None:
        self.loader, self.names, self.by_source, self.cap, self.total = loader, names, by_source, cap, total
        self.min_batch, self.keys = min_batch, keys

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        seen: dict[str, int] = {}
        held: dict[str, torch.Tensor] = {}  # a source's batch that leaves room for less than min_batch more
        for batch in self.loader:
            x, s = _split_batch(batch, self.keys, self.by_source)
            src = self._source_of(s) if self.by_source else POOLED
            if self.cap is not None:
                room = self.cap - seen.get(src, 0)
                if room <= 0:
                    continue
                if len(x) > room:
                    x = x[:room]
                    if room < self.min_batch and seen.get(src) and src not in held:  # never a one-sample batch
                        seen[src] = self.cap
                        continue
                seen[src] = seen.get(src, 0) + len(x)
                if src in held:
                    x = torch.cat([held.pop(src), x])
                elif 0 < self.cap - seen[src] < self.min_batch and isinstance(x, torch.Tensor):
                    held[src] = x
                    continue
            yield x, src
        yield from ((x, src) for src, x in held.items())

    def _source_of(self, s: Any) -> str:
        if s is None:
            return POOLED
        ids = torch.as_tensor(s).reshape(-1).unique()
        if len(ids) != 1:
            raise ValueError(
                "by_source=True needs single-source batches (statistics of a source are those seen in "
                "batches of that source alone); pass a SourceTaggedDataset, a single-source sampler, "
                "or by_source=False"
            )
        i = int(ids[0])
        if self.names is None:
            return str(i)
        if not 0 <= i < len(self.names):
            raise ValueError(f"a batch has source id {i}, but there are {len(self.names)} source_names "
                             f"{self.names}; give one name per id 0..{len(self.names) - 1}")
        return self.names[i]


class Replay:
    """A plan whose loaded batches are kept in memory from the first pass and replayed in later ones,
    when all of them fit in ``budget`` bytes; otherwise every pass loads them again.

    Why: sequential statistics take one pass per BN layer, and decoding or collating the data each time
    would dominate truncated passes. Memory is bounded by ``budget`` (the cache is dropped the moment it
    would pass it); only tensor inputs from a ``DataLoader`` are kept (in-memory batches are already
    there). Replayed inputs are copies, so a model that writes into its input cannot change later passes.
    """

    def __init__(self, plan: Batches, budget: int) -> None:
        self.plan, self.budget = plan, budget
        self.total, self.names = plan.total, plan.names
        self.kept: list[tuple[torch.Tensor, str]] | None = None
        self._worth = budget > 0 and isinstance(plan.loader, DataLoader)

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        if self.kept is not None:
            for x, src in self.kept:
                yield x.clone(), src
            return
        kept: list | None = [] if self._worth else None
        size = 0
        for x, src in self.plan:
            if kept is not None:
                size += x.element_size() * x.numel() if isinstance(x, torch.Tensor) else self.budget + 1
                if size <= self.budget:
                    kept.append((x.clone(), src))
                else:
                    kept = None
            yield x, src
        self.kept = kept


def _split_batch(batch: Any, keys: ItemKeys = DEFAULT_KEYS, by_source: bool = False) -> tuple[Any, Any]:
    """Inputs and source ids (or None) of a batch: a tensor ``x``, a tuple ``(x, y[, s])`` or a dict.

    A dict is read at ``keys`` (``keys.input``, ``keys.source``); when ``by_source`` a dict batch without
    the source key is refused rather than silently pooled (the key name is the likely mistake);
    ``ItemKeys(source=None)`` pools dict batches on purpose.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list, Mapping)):
        x, _, s = parts_of(batch, keys, "batch")
        if isinstance(batch, Mapping) and by_source and s is ABSENT and keys.source is not None:
            raise ValueError(
                f"by_source=True reads each batch's source ids, but the dict batch has keys "
                f"{sorted(map(str, batch))} and no source key {keys.source!r}; pass keys=ItemKeys(source=...) "
                "naming it, or by_source=False for pooled statistics"
            )
        return x, None if s is ABSENT else s
    raise TypeError(f"a batch must be a tensor x, a tuple (x, y[, source]) or a dict with key {keys.input!r}; "
                    f"got {type(batch).__name__}")


def rank_share(num_samples: int | None, world: int, rank: int) -> int | None:
    """Rank ``rank``'s part of a per-source cap split over ``world`` ranks (parts differ by one)."""
    if num_samples is None or world == 1:
        return num_samples
    return num_samples // world + (1 if rank < num_samples % world else 0)


def plan_batches(data: Any, batch_size: int, by_source: bool, cap: int | None,
          sampler: Iterable[list[int]] | None, seed: int, num_workers: int, min_batch: int, *,
          keys: ItemKeys | None = None, source_names: Sequence[str] | None = None, pin_memory: bool = False,
          persistent_workers: bool = False, shard: tuple[int, int] | None = None) -> Batches:
    """The batches ``collect_stats`` reads: from a Dataset (planned here, read by a DataLoader with
    ``num_workers``/``pin_memory``/``persistent_workers``) or a user's re-iterable of batches.

    ``shard=(world, rank)``: keep whole batches ``rank, rank + world, ...`` of a Dataset's plan (the
    data is the same on every rank; see ``distributed.plan_shard``).

    ``keys`` (``ItemKeys``, default input ``"image"``, source ``"source"``) says how dict batches are read;
    ``source_names`` names the integer source ids of a user's batches (a ``SourceTaggedDataset`` has its own).
    """
    keys = _check_keys(keys)
    given = _check_names(source_names)
    opts = _loader_options(num_workers, pin_memory, persistent_workers)
    check_dataset(data, "data", WRAP)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        tagged = isinstance(data, SourceTaggedDataset)
        data = data if tagged else LenChecked(data, "data")  # a __len__ that lies is named, not a bare IndexError
        names = list(data.source_names) if tagged else given
        if sampler is not None:  # the sampler's batches, the cap applied to them as they stream
            batches = _share([list(b) for b in sampler], shard)
            loader = DataLoader(data, batch_sampler=batches, **opts)
            return Batches(loader, names, by_source and tagged, cap, len(batches), min_batch, keys)
        if tagged and by_source:
            groups = [np.flatnonzero(data.source_ids == i) for i in np.unique(data.source_ids)]
        else:
            groups = [np.arange(len(data))]
        batches = []
        for g in groups:
            # each source from its own generator seeded by ``seed`` alone: a source's batches (and so its
            # batch-mode statistics) do not depend on the other sources in ``data``, so a site's own run
            # gives exactly what a run over the union of the sites gives for it
            g = np.random.default_rng(seed).permutation(g)
            if cap is not None:
                g = g[:cap]
            if len(g):  # near-equal chunks (sizes differ by one) so no tail batch of a single sample
                batches += [c.tolist() for c in np.array_split(g, -(-len(g) // batch_size))]
        batches = _share(batches, shard)
        loader = DataLoader(data, batch_sampler=batches, **opts)
        return Batches(loader, names, by_source and tagged, None, len(batches), keys=keys)
    if isinstance(data, Iterator):
        raise TypeError("data is a one-shot iterator; pass a re-iterable (a DataLoader, a list of batches)")
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a Dataset or an iterable of batches, got {type(data).__name__}")
    base = getattr(data, "dataset", None)
    names = list(base.source_names) if isinstance(base, SourceTaggedDataset) else given
    total = len(data) if hasattr(data, "__len__") else None
    return Batches(data, names, by_source, cap, total, min_batch, keys)


def _share(batches: list[list[int]], shard: tuple[int, int] | None) -> list[list[int]]:
    """This rank's whole batches of a plan every rank made alike (all of them without ``shard``)."""
    return batches if shard is None else batches[shard[1]::shard[0]]


def _check_names(names: Sequence[str] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"source_names must be a non-empty list of names, one per integer source id, got {names!r}")
    out = [str(n) for n in names]
    if len(set(out)) != len(out):
        raise ValueError(f"source_names must be distinct, got {out}")
    return out


def _check_keys(keys: ItemKeys | None) -> ItemKeys:
    if keys is None:
        return DEFAULT_KEYS
    if not isinstance(keys, ItemKeys):
        raise TypeError(f"keys must be an ItemKeys, e.g. ItemKeys(input='image', source='site'), got {keys!r}")
    return keys


def _loader_options(num_workers: int, pin_memory: bool, persistent_workers: bool) -> dict[str, Any]:
    """DataLoader keywords, checked here so a bad combination names the argument, not DataLoader internals."""
    num_workers = as_count(num_workers, "num_workers", 0)
    if persistent_workers and num_workers == 0:
        raise ValueError("persistent_workers=True keeps worker processes alive between passes and needs "
                         "num_workers > 0; set num_workers or leave persistent_workers=False")
    return {"num_workers": num_workers, "pin_memory": bool(pin_memory), "persistent_workers": bool(persistent_workers)}


def as_count(value: Any, what: str, minimum: int) -> int:
    """``value`` as an int (numpy integers accepted), else ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer >= {minimum}, got {value} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value}")
    return int(value)
