"""Decode once: a bounded cache of decoded, preprocessed items, in memory or in a memory-mapped file.

Why: the matrix and the report read every file once per pass (statistics, PreciseBN, one pass per
strategy, statistics source and grouping: 15 passes for five strategies), and decoding a PNG costs
about as much as a small model's forward. ``cached(ds)`` keeps each item's tensors after its first
read, so every later pass of the job reads them back bit for bit. Imports torch and the standard
library only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import Dataset

from shiftbn._torch import dataset_length

DEFAULT_MAX_BYTES = 1 << 30
"""Memory budget of ``cached`` when none is given: 1 GiB of tensors."""

DISK_RESERVE = 1 << 30
"""Free space ``cached`` leaves on the cache's disk when ``disk_bytes`` is not given: 1 GiB."""


class DecodeCache(Dataset):
    """``base`` read through a bounded cache: item ``i`` is read from ``base`` once, then from the cache.

    Why: see the module docstring. The first item decides where the cache lives: in memory when
    ``len(base)`` items of its size fit ``max_bytes``, else in one memory-mapped file of at most
    ``disk_bytes`` in ``dir`` (items beyond that are read from ``base`` every time). Only tensors
    count (and are stored); other parts of an item (labels, ids) are kept as they are. Items whose
    tensors differ in shape or dtype from the first item's are kept in memory while the budget lasts
    (memory) or not cached (file). Reads return fresh tensors, equal bit for bit to ``base``'s.

    Args:
        base: a map-style dataset whose items are deterministic (a random augmentation would be frozen
            at its first draw).
        max_bytes: memory budget in bytes (>= 0; 0: never in memory).
        dir: folder of the memory-mapped file (default: the system's temporary folder).
        disk_bytes: size limit of that file in bytes (>= 0; 0: no file); default: what the data needs,
            as long as ``DISK_RESERVE`` stays free on that disk.

    Returns:
        A map-style dataset; ``nbytes`` (bytes held), ``where`` (``"memory"``, ``"disk"``, ``"off"`` or
        ``None`` before the first read), ``path`` (the file, ``None`` once removed), ``hits``/``misses``.
        ``close()`` frees the memory and removes the file.

    Raises:
        ValueError: a negative budget, or ``dir`` not an existing folder.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = DecodeCache(TensorDataset(torch.arange(6.0).view(3, 2)), max_bytes=1024)
        >>> [data[i][0].tolist() for i in (0, 0, 2)], data.where, data.nbytes, data.hits
        ([[0.0, 1.0], [0.0, 1.0], [4.0, 5.0]], 'memory', 16, 1)
    """

    def __init__(self, base: Dataset, max_bytes: int = DEFAULT_MAX_BYTES, *, dir: str | Path | None = None,
                 disk_bytes: int | None = None) -> None:
        self.base = base
        self.n = dataset_length(base, "the cached dataset")
        self.max_bytes = _budget(max_bytes, "max_bytes")
        self.disk_bytes = None if disk_bytes is None else _budget(disk_bytes, "disk_bytes")
        self.dir = Path(tempfile.gettempdir() if dir is None else dir)
        if not self.dir.is_dir():
            raise ValueError(f"dir={str(self.dir)!r} is not an existing folder; create it or pass another "
                             "(the cache's memory-mapped file goes there)")
        self.where: str | None = None
        self.nbytes = 0
        self.hits = self.misses = 0
        self._memory: dict[int, tuple[list, Any]] = {}
        self._disk = _Disk()
        self._finalizer = weakref.finalize(self, self._disk.release)

    @property
    def path(self) -> Path | None:
        """The memory-mapped file while it has a name (on POSIX it is unlinked as soon as it is mapped)."""
        return self._disk.path

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        i = int(i)
        if -self.n <= i < 0:
            i += self.n
        found = self._get(i)
        if found is not None:
            self.hits += 1
            return found
        item = self.base[i]
        self.misses += 1
        if 0 <= i < self.n:
            self._put(i, item)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list:
        return [self[i] for i in indices]

    def close(self) -> None:
        """Free the memory and remove the file (also done when the cache is garbage collected).

        Why: ``cached`` calls it on leaving its block, also on an exception or Ctrl-C.

        Args:
            None.

        Returns:
            None; later reads go to ``base`` (``where`` is ``"off"``).

        Example:
            >>> data = DecodeCache([torch.zeros(2)], max_bytes=64)
            >>> _ = data[0]
            >>> data.close()
            >>> data.nbytes, data.where
            (0, 'off')
        """
        self._memory.clear()
        self._finalizer()
        self.nbytes = 0
        self.where = "off" if self.where is not None else None

    def _get(self, i: int) -> Any:
        if self.where == "memory":
            held = self._memory.get(i)
            if held is None:
                return None
            leaves, spec = held
            return tree_unflatten([v.clone() if isinstance(v, torch.Tensor) else v for v in leaves], spec)
        if self.where == "disk":
            return self._disk.get(i)
        return None

    def _put(self, i: int, item: Any) -> None:
        leaves, spec = tree_flatten(item)
        size = sum(v.nbytes for v in leaves if isinstance(v, torch.Tensor))
        if self.where is None:
            self._choose(leaves, spec, size)
        if self.where == "memory" and self.nbytes + size <= self.max_bytes:
            self._memory[i] = ([v.clone() if isinstance(v, torch.Tensor) else v for v in leaves], spec)
            self.nbytes += size
        elif self.where == "disk":
            self._disk.put(i, leaves, spec)

    def _choose(self, leaves: list, spec: Any, size: int) -> None:
        """Memory when every item of this size fits ``max_bytes``, else a file, else nothing."""
        if size * self.n <= self.max_bytes:
            self.where = "memory"
            return
        budget = self.disk_bytes
        if budget is None:
            budget = max(0, shutil.disk_usage(self.dir).free - DISK_RESERVE)
        slots = min(self.n, budget // size) if size else 0
        if slots == 0:
            self.where = "off"
            return
        self._disk.open(self.dir, slots, leaves, spec)
        self.where = "disk"
        self.nbytes = slots * size


class _Disk:
    """The file tier: one slab per tensor of an item, slot ``i`` holding item ``i`` (``i < slots``)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.storage: torch.Tensor | None = None
        self.slabs: list[torch.Tensor] = []
        self.filled: list[bool] = []
        self.rest: list[list | None] = []
        self.spec: Any = None
        self.kinds: list[tuple[torch.Size, torch.dtype] | None] = []

    def open(self, folder: Path, slots: int, leaves: list, spec: Any) -> None:
        self.kinds = [(v.shape, v.dtype) if isinstance(v, torch.Tensor) else None for v in leaves]
        sizes = [v.nbytes for v in leaves if isinstance(v, torch.Tensor)]
        fd, name = tempfile.mkstemp(prefix="shiftbn-cache-", suffix=".bin", dir=folder)
        self.path = Path(name)
        try:
            os.ftruncate(fd, slots * sum(sizes))
        finally:
            os.close(fd)
        self.storage = torch.from_file(name, shared=True, size=slots * sum(sizes), dtype=torch.uint8)
        try:  # POSIX: the mapping outlives the name, so no file is left behind even if the process is killed
            os.unlink(name)
            self.path = None
        except OSError:
            pass
        offset = 0
        for kind in self.kinds:
            if kind is None:
                continue
            shape, dtype = kind
            count = slots * int(torch.Size(shape).numel()) * dtype.itemsize
            self.slabs.append(self.storage[offset:offset + count].view(dtype).view(slots, *shape))
            offset += count
        self.filled = [False] * slots
        self.rest = [None] * slots
        self.spec = spec

    def get(self, i: int) -> Any:
        if i >= len(self.filled) or not self.filled[i]:
            return None
        slabs = iter(self.slabs)
        leaves = [next(slabs)[i].clone() if kind is not None else v
                  for kind, v in zip(self.kinds, self.rest[i], strict=True)]
        return tree_unflatten(leaves, self.spec)

    def put(self, i: int, leaves: list, spec: Any) -> None:
        if i >= len(self.filled) or spec != self.spec or len(leaves) != len(self.kinds):
            return
        kinds = [(v.shape, v.dtype) if isinstance(v, torch.Tensor) else None for v in leaves]
        if kinds != self.kinds:
            return
        slabs = iter(self.slabs)
        for v in leaves:
            if isinstance(v, torch.Tensor):
                next(slabs)[i].copy_(v)
        self.rest[i] = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        self.filled[i] = True

    def release(self) -> None:
        self.slabs, self.storage, self.filled, self.rest = [], None, [], []
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _budget(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a number of bytes >= 0 (0: none), got {value!r}")
    return value


@contextmanager
def cached(ds: Dataset, max_bytes: int = DEFAULT_MAX_BYTES, *, dir: str | Path | None = None,
           disk_bytes: int | None = None) -> Iterator[Dataset]:
    """``ds`` whose items are decoded once for every pass made inside the ``with`` block.

    Why: a job that makes P passes over the same files (``cross_source_matrix``, ``build_report``)
    otherwise decodes each file P times. Views (``take``, ``subset``, ``split``) of the yielded
    dataset share its cache. On leaving the block (also on an exception or Ctrl-C) the memory is
    freed and the file removed; outputs are bit for bit those of ``ds``.

    Args:
        ds: a ``SourceTaggedDataset`` (its ``base`` is cached; the yielded dataset is a view with the
            same sources, labels and metadata) or any map-style dataset (cached as a whole).
        max_bytes: memory budget in bytes (default 1 GiB); data larger than that goes to a file.
        dir: folder of that memory-mapped file (default: the system's temporary folder; pick local disk).
        disk_bytes: size limit of the file (default: what the data needs, leaving 1 GiB free).

    Returns:
        A context manager yielding the cached dataset; its ``DecodeCache`` is ``.base`` (tagged) or
        the dataset itself.

    Raises:
        ValueError: a negative budget, or ``dir`` not an existing folder.

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> with cached(ds, max_bytes=10_000) as fast:
        ...     table = sb.cross_source_matrix(model, fast, ["ema", "target"], progress=False)
        ...     fast.base.where, fast.base.misses
        ('memory', 60)
    """
    from shiftbn.data.tagged import SourceTaggedDataset

    inner = ds.base if isinstance(ds, SourceTaggedDataset) else ds
    cache = DecodeCache(inner, max_bytes, dir=dir, disk_bytes=disk_bytes)
    try:
        if isinstance(ds, SourceTaggedDataset):
            view = type(ds).__new__(type(ds))
            view.__dict__.update(ds.__dict__)
            view.base = cache
            yield view
        else:
            yield cache
    finally:
        cache.close()
