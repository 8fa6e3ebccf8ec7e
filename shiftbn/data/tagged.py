"""`SourceTaggedDataset`: any map-style dataset with one source label per sample."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset

UNLABELED = -1


def _source_order(values: Sequence[Hashable] | np.ndarray | pd.Series) -> tuple[list[str], np.ndarray]:
    """Names in sorted order (categories order for a Categorical) and one int64 id per sample."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        values = pd.Categorical(values)
    if isinstance(values, pd.Categorical):
        if values.isna().any():
            raise ValueError("sources contain missing values; give every sample a source label")
        used = [c for c in values.categories if (values == c).any()]
        names = [str(c) for c in used]
        codes = pd.Categorical(values, categories=used).codes.astype(np.int64)
        return _check_unique(names), codes
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.ndim != 1:
        raise ValueError(f"sources must be one label per sample (1-D), got shape {arr.shape}")
    if pd.isna(pd.Series(arr)).any():
        raise ValueError("sources contain missing values; give every sample a source label")
    try:
        uniques, codes = np.unique(arr, return_inverse=True)
    except TypeError:  # labels of mixed types cannot be sorted: keep first-seen order
        codes_, uniques = pd.factorize(pd.Series(arr, dtype=object), sort=False)
        uniques, codes = np.asarray(uniques), codes_
    names = [str(u) for u in uniques]
    return _check_unique(names), np.asarray(codes, dtype=np.int64).reshape(-1)


def _check_unique(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise ValueError(f"source labels collide once written as strings: {names}")
    return names


def _infer_labels(base: Dataset) -> np.ndarray | None:
    for attr in ("targets", "labels"):
        lab = getattr(base, attr, None)
        if lab is not None:
            return np.asarray(lab).reshape(-1)
    return None


class SourceTaggedDataset(Dataset):
    """A map-style dataset whose items are ``(x, y, source_id)``.

    Why: every shiftbn analysis needs to know which lab, hospital or scanner a sample came from.
    ``base[i]`` may return ``(x, y)`` or ``x`` (then ``y`` is -1). ``sources`` holds one hashable
    label per sample (list, numpy array, pandas Series or Categorical); names are stored as
    strings in **sorted order** (a Categorical keeps its category order; labels of mixed types
    that cannot be sorted keep first-seen order). ``ds.source_names[s]`` is the name of id ``s``;
    the name -> id map is carried unchanged by ``subset`` and ``split``, so ids stay stable.
    ``labels`` (one int per sample) is taken from ``base.targets``/``base.labels`` when not given.
    """

    def __init__(
        self,
        base: Dataset,
        sources: Sequence[Hashable] | np.ndarray | pd.Series,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        source_names: Sequence[str] | None = None,
    ) -> None:
        if not hasattr(base, "__getitem__") or not hasattr(base, "__len__"):
            raise TypeError(f"base must be a map-style dataset with __len__/__getitem__, got {type(base).__name__}")
        n = len(base)
        if source_names is None:
            names, ids = _source_order(sources)
        else:
            names = [str(s) for s in source_names]
            ids = np.asarray(sources, dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
                raise ValueError("source ids fall outside source_names")
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} source labels for a dataset of {n} samples; give one per sample")
        self.base = base
        self.source_names: tuple[str, ...] = tuple(names)
        self.source_ids: np.ndarray = ids
        lab = _infer_labels(base) if labels is None else np.asarray(labels).reshape(-1)
        if lab is not None and len(lab) != n:
            raise ValueError(f"got {len(lab)} labels for a dataset of {n} samples")
        self.labels: np.ndarray | None = None if lab is None else lab.astype(np.int64)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_datasets(cls, datasets: Mapping[str, Dataset]) -> SourceTaggedDataset:
        """One dataset per source, e.g. ``{"lab_a": d1, "lab_b": d2}``; source order = sorted names."""
        if not datasets:
            raise ValueError("from_datasets needs at least one {name: dataset} entry")
        names = sorted(str(k) for k in datasets)
        by_name = {str(k): v for k, v in datasets.items()}
        parts = [by_name[k] for k in names]
        sources = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(parts)])
        labels = [_infer_labels(d) for d in parts]
        lab = None if any(v is None for v in labels) else np.concatenate(labels)
        return cls(ConcatDataset(parts), sources, lab, source_names=names)

    @classmethod
    def from_frame(cls, frame, **kwargs) -> SourceTaggedDataset:
        """A manifest (DataFrame, CSV or Parquet: path, label, source); see ``shiftbn.data.from_frame``."""
        from shiftbn.data.files import from_frame

        return from_frame(frame, **kwargs)

    @classmethod
    def from_folder(cls, root, **kwargs) -> SourceTaggedDataset:
        """An image tree ``root/<source>/<class>/<file>``; see ``shiftbn.data.from_folder``."""
        from shiftbn.data.files import from_folder

        return from_folder(root, **kwargs)

    # --- dataset protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        item = self.base[int(i)]
        if isinstance(item, (tuple, list)):
            if len(item) < 2:
                x, y = item[0], UNLABELED
            else:
                x, y = item[0], item[1]
        else:
            x, y = item, UNLABELED
        return x, y, int(self.source_ids[i])

    # --- metadata ------------------------------------------------------------------------------
    @property
    def sources_present(self) -> list[str]:
        """Names of the sources that hold at least one sample, in id order."""
        present = np.unique(self.source_ids)
        return [self.source_names[i] for i in present]

    def source_id(self, name: Hashable) -> int:
        """The int id of source ``name`` (ValueError naming the known sources if absent)."""
        try:
            return self.source_names.index(str(name))
        except ValueError:
            raise ValueError(f"unknown source {name!r}; known sources: {list(self.source_names)}") from None

    def indices_of(self, name: Hashable) -> np.ndarray:
        """Dataset positions (int64) of the samples of source ``name``."""
        return np.flatnonzero(self.source_ids == self.source_id(name))

    def counts(self) -> pd.DataFrame:
        """Tidy sample counts: columns ``source, n`` (and ``label`` when labels are known)."""
        names = np.asarray(self.source_names, dtype=object)[self.source_ids]
        df = pd.DataFrame({"source": names})
        keys = ["source"]
        if self.labels is not None:
            df["label"] = self.labels
            keys.append("label")
        out = df.groupby(keys, sort=True).size().rename("n").reset_index()
        return out

    # --- views ---------------------------------------------------------------------------------
    def take(self, indices: Sequence[int] | np.ndarray) -> SourceTaggedDataset:
        """A view on the samples at ``indices`` (positions in this dataset); ids are kept."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)})")
        sub = SourceTaggedDataset.__new__(SourceTaggedDataset)
        sub.base = torch.utils.data.Subset(self.base, idx.tolist())
        sub.source_names = self.source_names
        sub.source_ids = self.source_ids[idx]
        sub.labels = None if self.labels is None else self.labels[idx]
        return sub

    def subset(self, sources: Sequence[Hashable] | Hashable) -> SourceTaggedDataset:
        """Only the samples of the named ``sources`` (one name or a list); ids are kept."""
        wanted = [sources] if isinstance(sources, (str, int)) else list(sources)
        ids = [self.source_id(s) for s in wanted]
        return self.take(np.flatnonzero(np.isin(self.source_ids, ids)))

    def split(
        self,
        by: str = "source",
        fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        seed: int = 0,
    ) -> Splits:
        """Per-source train / calibration / test splits, stratified by class where labels exist.

        Why: AdaBN-style recalibration needs unlabeled calibration data disjoint from the test data.
        Every (source, class) group is shuffled with ``seed`` and cut at ``fractions``.
        """
        if by != "source":
            raise ValueError(f"split(by={by!r}) is not supported; use by='source'")
        fr = np.asarray(fractions, dtype=float)
        if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
        rng = np.random.default_rng(seed)
        groups = self.source_ids if self.labels is None else self.source_ids * (self.labels.max() + 2) + (
            self.labels + 1
        )
        parts: list[list[np.ndarray]] = [[], [], []]
        for g in np.unique(groups):
            members = rng.permutation(np.flatnonzero(groups == g))
            cuts = np.round(np.cumsum(fr)[:2] * len(members)).astype(int)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].append(piece)
        train, cal, test = (self.take(np.sort(np.concatenate(p))) for p in parts)
        return Splits(train=train, calibration=cal, test=test)

    def __repr__(self) -> str:
        return f"SourceTaggedDataset(n={len(self)}, sources={list(self.sources_present)})"


@dataclass
class Splits:
    """Three disjoint views of one dataset: ``train``, ``calibration`` (unlabeled use) and ``test``."""

    train: SourceTaggedDataset
    calibration: SourceTaggedDataset
    test: SourceTaggedDataset
