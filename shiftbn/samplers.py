"""`SourceBatchSampler`: batches built from sources — random, single-source, mixed, k sources per batch.

Why: BN normalizes over a batch, so which sources share a batch decides what the network learns
(Wu & Johnson 2021, Section 5). Every epoch is built with vectorized numpy from ``seed`` and the
epoch number, then sharded across ranks by whole batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch.utils.data import Sampler

from shiftbn.data._checks import as_count

__all__ = ["BALANCES", "MODES", "EpochBatches", "SamplerMode", "SourceBatchSampler"]

MODES = ("random", "single", "mixed")
BALANCES = ("proportional", "equal")

SamplerMode = Literal["random", "single", "mixed"]


@dataclass(frozen=True)
class EpochBatches:
    """One rank's batches for one epoch as flat arrays.

    Why: flat arrays keep an epoch of millions of samples cheap; ``padding`` lets distributed
    evaluation drop the batches repeated only so that all ranks get the same count.

    Args:
        indices: (total,) int64 dataset positions, batch after batch.
        offsets: (batches + 1,) int64; batch ``b`` is ``indices[offsets[b]:offsets[b+1]]``.
        padding: (batches,) bool, True for a repeated (padding) batch.

    Returns:
        A frozen ``EpochBatches``; ``len()`` is the number of batches, ``batch(b)`` one batch.

    Example:
        >>> eb = EpochBatches(np.arange(5), np.array([0, 2, 5]), np.zeros(2, dtype=bool))
        >>> len(eb), eb.batch(1).tolist()
        (2, [2, 3, 4])
    """

    indices: np.ndarray
    offsets: np.ndarray
    padding: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, b: int) -> np.ndarray:
        """The dataset positions of batch ``b``.

        Why: batches are slices of one flat array; this reads one without building a list per batch.

        Args:
            b: batch number, 0 <= b < ``len(self)``.

        Returns:
            (size_b,) int64 positions (a view, not a copy).

        Example:
            >>> eb = SourceBatchSampler([0, 0, 1, 1], batch_size=2, mode="single").epoch_batches()
            >>> sorted(len(eb.batch(b)) for b in range(len(eb)))
            [2, 2]
        """
        return self.indices[self.offsets[b] : self.offsets[b + 1]]


class SourceBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset positions; use as ``DataLoader(ds, batch_sampler=sampler)``.

    Modes (``mode``):
      * ``"random"``: shuffled batches, sources ignored (the baseline).
      * ``"single"``: every batch from one source; batches of all sources interleaved randomly.
        A source's last batch may be smaller (dropped with ``drop_last``).
      * ``"mixed"`` with ``sources_per_batch=None``: every batch holds every source in proportion
        to the source sizes (or equal shares); batch sizes differ by at most one sample.
      * ``"mixed"`` with ``sources_per_batch=k``: every batch holds exactly ``k`` sources with
        ``batch_size // k`` samples each (``batch_size`` must be a multiple of ``k``); how often a
        source appears follows ``balance``. At most one remainder batch an epoch has fewer sources
        or samples; ``drop_last`` drops it and partial chunks.

    ``balance="proportional"``: an epoch visits each index exactly once. ``"equal"``: each source
    contributes ``ceil(N / S)`` samples an epoch — small sources are oversampled (repeated, each
    repeat reshuffled), large ones subsampled (a fresh subset each epoch).

    Distributed: with ``num_replicas > 1`` all ranks build the same epoch from ``seed`` and the
    epoch, and rank ``r`` takes whole batches ``r, r + R, ...``; the batch list is padded by
    repeating its first batches so that every rank gets as many (``drop_last`` trims instead).
    ``epoch_batches().padding`` says which batches are repeats, so evaluation can drop them.

    Args:
        source_ids: (N,) non-negative integer source id per sample (``SourceTaggedDataset.source_ids``).
        batch_size: samples per batch (>= 1).
        mode: ``"random"`` (default), ``"single"`` or ``"mixed"`` (see above).
        sources_per_batch: with ``mode="mixed"``, exactly this many sources per batch; ``None``
            (default): every source in every batch.
        balance: ``"proportional"`` (default) or ``"equal"`` (see above).
        drop_last: drop incomplete batches (and trim instead of padding across ranks).
        seed: with the epoch, seeds every shuffle (default 0).
        num_replicas: number of ranks sharing the epoch (default 1).
        rank: this rank, 0 <= rank < num_replicas.

    Returns:
        A ``torch.utils.data.Sampler`` yielding lists of dataset positions, one list per batch;
        ``len()`` is this rank's number of batches.

    Raises:
        ValueError: bad arguments, or an epoch the mode cannot build (e.g. a source too small to be
            in every batch); the message names the value and the fix.

    Example:
        >>> sampler = SourceBatchSampler([0, 0, 0, 1, 1, 1], batch_size=3, mode="single", seed=0)
        >>> ids = np.array([0, 0, 0, 1, 1, 1])
        >>> [sorted(set(ids[b].tolist())) for b in sampler]  # one source per batch
        [[0], [1]]
        >>> from torch.utils.data import DataLoader
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> loader = DataLoader(ds, batch_sampler=SourceBatchSampler(ds.source_ids, 8, mode="mixed"))
        >>> x, y, s = next(iter(loader))
        >>> len(set(s.tolist()))  # every lab in every batch
        4
    """

    def __init__(
        self,
        source_ids: Sequence[int] | np.ndarray,
        batch_size: int,
        mode: SamplerMode = "random",
        sources_per_batch: int | None = None,
        balance: str = "proportional",
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        ids = np.asarray(source_ids).reshape(-1)
        if ids.size == 0:
            raise ValueError("source_ids is empty; the sampler needs at least one sample")
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
            raise ValueError("source_ids must be non-negative integers (use SourceTaggedDataset.source_ids)")
        batch_size = as_count(batch_size, "batch_size")
        num_replicas = as_count(num_replicas, "num_replicas")
        rank = as_count(rank, "rank", minimum=0)
        if sources_per_batch is not None:
            sources_per_batch = as_count(sources_per_batch, "sources_per_batch")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if balance not in BALANCES:
            raise ValueError(f"unknown balance {balance!r}; choose one of {BALANCES}")
        if not rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.source_ids = ids.astype(np.int64)
        self._sources, self._groups = _group(self.source_ids)
        n_sources = len(self._sources)
        if sources_per_batch is not None:
            if mode != "mixed":
                raise ValueError("sources_per_batch applies to mode='mixed' only")
            if not 1 <= sources_per_batch <= n_sources:
                raise ValueError(
                    f"sources_per_batch={sources_per_batch} but the data has {n_sources} sources; "
                    f"choose 1..{n_sources}"
                )
            if batch_size % sources_per_batch:
                raise ValueError(
                    f"batch_size={batch_size} is not a multiple of sources_per_batch={sources_per_batch}; "
                    "each source fills batch_size // sources_per_batch slots"
                )
        self.batch_size = batch_size
        self.mode = mode
        self.sources_per_batch = sources_per_batch
        self.balance = balance
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._cache: tuple[int, EpochBatches] | None = None
        self.epoch_batches()  # validate feasibility now, with a clear error

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically for ``epoch`` (call before each epoch, as with DistributedSampler).

        Why: without it every epoch repeats the same batches; with it all ranks agree on the epoch.

        Args:
            epoch: the epoch number; with ``seed`` it decides every shuffle.

        Returns:
            None; later iterations yield that epoch's batches.

        Example:
            >>> sampler = SourceBatchSampler(np.zeros(8, dtype=int), batch_size=4, seed=0)
            >>> first = list(sampler)
            >>> sampler.set_epoch(1)
            >>> list(sampler) != first, sampler.epoch
            (True, 1)
        """
        self.epoch = int(epoch)

    def epoch_batches(self, epoch: int | None = None) -> EpochBatches:
        """This rank's batches of ``epoch`` as flat arrays, with padding flags.

        Why: evaluation needs to know which batches are repeats added to even out ranks.

        Args:
            epoch: the epoch (default ``None``: the one set by ``set_epoch``).

        Returns:
            ``EpochBatches`` (indices, offsets, padding) of this rank; cached for the latest epoch.

        Raises:
            ValueError: the mode cannot build the epoch (e.g. a source too small to be in every batch).

        Example:
            >>> sampler = SourceBatchSampler(np.arange(5) % 2, batch_size=2, num_replicas=2, rank=1)
            >>> eb = sampler.epoch_batches()
            >>> len(eb), eb.padding.tolist()  # 3 batches for 2 ranks: rank 1 gets a repeat
            (2, [False, True])
        """
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "random" and self.balance == "proportional":
            flat = rng.permutation(len(self.source_ids))
            sizes = _chunk_sizes(len(flat), self.batch_size, self.drop_last)
            flat = flat[: int(sizes.sum())]
        else:
            streams = _streams(self._groups, self.balance, rng)
            bs, drop = self.batch_size, self.drop_last
            if self.mode == "random":
                flat, sizes = _random(streams, bs, drop, rng)
            elif self.mode == "single":
                flat, sizes = _single(streams, bs, drop, rng)
            elif self.sources_per_batch is None:
                flat, sizes = _mixed_all(streams, self._sources, bs, drop, rng)
            else:
                flat, sizes = _mixed_k(streams, self._sources, bs, self.sources_per_batch, drop, rng)
        out = _shard(flat, sizes, self.num_replicas, self.rank, self.drop_last)
        self._cache = (epoch, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        eb = self.epoch_batches()
        for b in range(len(eb)):
            yield eb.batch(b).tolist()

    def __len__(self) -> int:
        return len(self.epoch_batches())


# --- epoch construction (pure functions over index arrays) ---------------------------------------

def _group(ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The source ids present (sorted) and, per source, its positions in increasing order.

    Small ids (below 2**16 or the sample count): a stable radix sort of 16-bit keys and a bincount,
    O(N). Large, sparse ids (e.g. 10**12) are compacted with ``np.unique`` first, so no array is
    sized by the largest id.
    """
    if ids.max() < max(2**16, len(ids)):
        keys = ids.astype(np.uint16) if ids.max() < 2**16 else ids
        counts = np.bincount(ids)
        present = np.flatnonzero(counts)
        counts = counts[present]
    else:
        present, keys, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.argsort(keys, kind="stable")
    return present, np.split(order, np.cumsum(counts)[:-1])


def _streams(groups: list[np.ndarray], balance: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Per source, the positions it contributes this epoch, in random order."""
    if balance == "proportional":
        return [rng.permutation(g) for g in groups]
    target = -(-sum(len(g) for g in groups) // len(groups))
    out = []
    for g in groups:
        reps = -(-target // len(g))
        out.append(np.concatenate([rng.permutation(g) for _ in range(reps)])[:target])
    return out


def _chunk_sizes(n: int, size: int, drop_last: bool) -> np.ndarray:
    full, rest = divmod(n, size)
    sizes = np.full(full, size, dtype=np.int64)
    return sizes if drop_last or rest == 0 else np.append(sizes, rest)


def _gather(flat: np.ndarray, sizes: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder whole batches of ``flat`` (given by ``sizes``) into ``order``."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    new_sizes = sizes[order]
    total = int(new_sizes.sum())
    new_starts = np.concatenate([[0], np.cumsum(new_sizes)[:-1]])
    pos = np.repeat(starts[order] - new_starts, new_sizes) + np.arange(total)
    return flat[pos], new_sizes


def _random(streams, batch_size, drop_last, rng):
    flat = rng.permutation(np.concatenate(streams))
    sizes = _chunk_sizes(len(flat), batch_size, drop_last)
    return flat[: int(sizes.sum())], sizes


def _single(streams, batch_size, drop_last, rng):
    per_source = [_chunk_sizes(len(s), batch_size, drop_last) for s in streams]
    if any(len(c) == 0 for c in per_source):
        raise ValueError(
            f"mode='single' with drop_last=True: a source has fewer than batch_size={batch_size} "
            "samples and would never be seen; lower batch_size or set drop_last=False"
        )
    kept = np.concatenate([s[: int(c.sum())] for s, c in zip(streams, per_source, strict=True)])
    sizes = np.concatenate(per_source)
    return _gather(kept, sizes, rng.permutation(len(sizes)))


def _mixed_all(streams, sources, batch_size, drop_last, rng):
    lengths = np.array([len(s) for s in streams])
    n = int(lengths.sum())
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    smallest = int(np.argmin(lengths))
    if n_batches == 0 or lengths[smallest] < n_batches:
        raise ValueError(
            f"mode='mixed' needs every source in every batch, but source id {sources[smallest]} has "
            f"{lengths[smallest]} samples for {n_batches} batches; raise batch_size, use "
            "balance='equal', or use sources_per_batch"
        )
    # Stratified interleave: element j of source s gets key (j + u_s) / n_s, so each stretch of
    # consecutive keys holds every source in proportion to its size.
    src = np.repeat(np.arange(len(streams)), lengths)
    within = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keys = (within + rng.random(len(streams))[src]) / lengths[src]
    order = np.argsort(keys, kind="stable")
    flat = np.concatenate(streams)[order]
    if drop_last:
        sizes = np.full(n_batches, batch_size, dtype=np.int64)
    else:
        sizes = np.array([len(a) for a in np.array_split(np.empty(n, dtype=np.int8), n_batches)])
    flat = flat[: int(sizes.sum())]
    _check_coverage(order, src, sizes, len(streams), sources)
    return _gather(flat, sizes, rng.permutation(len(sizes)))


def _check_coverage(order, src, sizes, n_sources, sources) -> None:
    """Raise unless every batch holds every source (positions of one source are increasing)."""
    n_kept = int(sizes.sum())
    batch_of_pos = np.repeat(np.arange(len(sizes)), sizes)
    pos_of = np.empty(len(order), dtype=np.int64)
    pos_of[order] = np.arange(len(order))
    kept = pos_of < n_kept
    b = batch_of_pos[pos_of[kept]]
    s = src[kept]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)] - 1
    gaps = np.diff(b)
    gaps[ends[:-1]] = 1  # source boundaries are not gaps
    ok = (b[starts] == 0).all() and (b[ends] == len(sizes) - 1).all() and (gaps <= 1).all()
    if not ok or len(starts) != n_sources:
        raise ValueError(
            "mode='mixed' could not put every source in every batch: some sources are too small for "
            "this batch_size; raise batch_size, use balance='equal', or use sources_per_batch"
        )


def _mixed_k(streams, sources, batch_size, k, drop_last, rng):
    c = batch_size // k
    per_source = [_chunk_sizes(len(s), c, drop_last) for s in streams]
    src_order = rng.permutation(len(streams))
    chunk_sizes = np.concatenate([per_source[i] for i in src_order])
    flat = np.concatenate([streams[i][: int(per_source[i].sum())] for i in src_order])
    m = len(chunk_sizes)
    n_full = m // k
    counts = np.array([len(p) for p in per_source])
    if n_full == 0 or counts.max() > n_full:
        worst = int(np.argmax(counts))
        raise ValueError(
            f"sources_per_batch={k}: source id {sources[worst]} fills {counts[worst]} chunks of {c} but an "
            f"epoch has only {n_full} batches of {k} distinct sources; use balance='equal', a smaller "
            "sources_per_batch, or a larger batch_size"
        )
    # Fill batches column-wise: chunk p of the source-major list goes to batch p % n_full. Chunks of
    # one source are contiguous and no source has more than n_full, so a batch never repeats one.
    p = np.arange(n_full * k)
    batch_of_chunk = np.concatenate([p % n_full, np.full(m - n_full * k, n_full)])
    chunk_order = np.lexsort((np.arange(m), batch_of_chunk))
    flat, chunk_sizes_ordered = _gather(flat, chunk_sizes, chunk_order)
    batch_ids = batch_of_chunk[chunk_order]
    sizes = np.bincount(batch_ids, weights=chunk_sizes_ordered).astype(np.int64)
    if drop_last and m > n_full * k:
        flat, sizes = flat[: int(sizes[:-1].sum())], sizes[:-1]
    return _gather(flat, sizes, rng.permutation(len(sizes)))


def _shard(flat: np.ndarray, sizes: np.ndarray, replicas: int, rank: int, drop_last: bool) -> EpochBatches:
    n = len(sizes)
    if replicas == 1:
        return EpochBatches(flat, np.concatenate([[0], np.cumsum(sizes)]), np.zeros(n, dtype=bool))
    if drop_last:
        take = np.arange(rank, (n // replicas) * replicas, replicas)
        padding = np.zeros(len(take), dtype=bool)
    else:
        total = -(-n // replicas) * replicas
        every = np.arange(total)
        take = every[rank::replicas] % n
        padding = every[rank::replicas] >= n
    mine, my_sizes = _gather(flat, sizes, take)
    return EpochBatches(mine, np.concatenate([[0], np.cumsum(my_sizes)]), padding)
