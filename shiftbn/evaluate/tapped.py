"""Labels read from the evaluation batches themselves, for datasets with no cheap label accessor.

Why: a lazily decoded dataset whose items carry ``(image, label)`` but that exposes no
``targets``/``labels`` must not be read twice (once for labels, once to evaluate): the labels are
taken from the items as the first evaluation of each source reads them. Under ``torch.distributed``
each rank reads only its rows, so the labels are gathered once per source (every rank asks for each
source's labels at the same point of the matrix).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from shiftbn.bn.distributed import RankSync
from shiftbn.data._checks import UNLABELED
from shiftbn.data.tagged import SourceTaggedDataset


class LabelTap(Dataset):
    """A view of a ``SourceTaggedDataset`` that records each item's label as it is read (N,) int64, -2 = unread.

    Items are recorded in the process that reads them (evaluation reads in the main process).
    """

    def __init__(self, ds: SourceTaggedDataset, regression: bool = False) -> None:
        self.ds = ds
        self.regression = regression  # float targets, NaN = unread
        self.seen = np.full(len(ds), np.nan, dtype=np.float64) if regression else np.full(len(ds), -2, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def _note(self, i: int, item: Any) -> Any:
        self.seen[i] = float(item[1]) if self.regression else int(item[1])
        return item

    def __getitem__(self, i: int) -> Any:
        return self._note(int(i), self.ds[int(i)])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        idx = [int(i) for i in indices]
        return [self._note(i, item) for i, item in zip(idx, self.ds.__getitems__(idx), strict=True)]


class TappedLabels(Mapping):
    """Eval source -> labels (N,) int64: the dataset's own where it has them, else read by a ``LabelTap``."""

    def __init__(self, parts: Mapping[str, SourceTaggedDataset], regression: bool = False) -> None:
        self.parts = dict(parts)
        self.regression = regression
        self.known = {s: p.labels for s, p in parts.items() if p.labels is not None and not regression}
        self.taps = {s: LabelTap(p, regression) for s, p in parts.items() if s not in self.known}
        self._done: dict[str, np.ndarray] = {}

    def inputs(self, source: str) -> Dataset:
        """What strategies evaluate for ``source``: the tap where labels must be read on the way."""
        return self.taps[source] if source in self.taps else self.parts[source]

    def __getitem__(self, source: str) -> np.ndarray:
        if source in self.known:
            return self.known[source]
        if source not in self._done:
            tap = self.taps[source]
            sync = RankSync()
            seen = tap.seen
            if sync.world > 1:  # each rank read its rows only
                views = sync.gather(lambda: tap.seen)
                seen = np.max(np.stack(views), axis=0)
            unread = np.isnan(seen) if self.regression else seen == -2
            if unread.any():
                raise RuntimeError(f"the labels of {int(unread.sum())} samples of source {source!r} were not "
                                   "read by its evaluation; give the dataset labels (labels=...)")
            if not self.regression and (seen == UNLABELED).any():
                raise ValueError(
                    f"evaluation needs labels, but {int((seen == UNLABELED).sum())} items of source {source!r} carry "
                    "none and the dataset has no labels; pass them to SourceTaggedDataset(base, sources, "
                    "labels=...) as one class id per sample, the name of a metadata column, or a label-only "
                    "callable f(i) -> class id")
            self._done[source] = seen
        return self._done[source]

    def check_first(self) -> None:
        """Read one item of each source without labels: an early error when items carry none either."""
        for source, tap in self.taps.items():
            if not self.regression and len(tap) and int(tap.ds[0][1]) == UNLABELED:
                raise ValueError(
                    f"evaluation needs labels, but this dataset has none (its base exposes no targets/labels and "
                    f"its items, e.g. of source {source!r}, carry none); pass them to SourceTaggedDataset(base, "
                    "sources, labels=...) as one class id per sample, the name of a metadata column, or a "
                    "label-only callable f(i) -> class id")

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)
