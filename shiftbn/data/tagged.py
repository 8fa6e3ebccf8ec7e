"""`SourceTaggedDataset`: any map-style dataset with one source label per sample."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from shiftbn._torch import DatasetLengthError, dataset_length, len_mismatch
from shiftbn.data._checks import UNLABELED, check_dataset, encode_labels, rows
from shiftbn.data.items import ABSENT, DEFAULT_KEYS, ItemKeys, gather, parts_of

LabelsArg = Sequence[int] | np.ndarray | pd.Series | str | Callable[[int], Any] | None


def _source_order(values: Sequence[Hashable] | np.ndarray | pd.Series) -> tuple[list[str], np.ndarray]:
    """Names in sorted order (categories order for a Categorical) and one int64 id per sample."""
    values = _plain(values)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
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
    missing = np.asarray(pd.isna(pd.Series(arr)), dtype=bool)
    if missing.any():
        raise ValueError(f"sources contain missing values at {rows(missing)}; give every sample a source label")
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


def _infer_labels(base: Dataset, keys: ItemKeys = DEFAULT_KEYS) -> tuple[object, str] | None:
    """Labels a dataset exposes without loading items (never by decoding an image).

    In order: ``base.targets``/``base.labels``; a ``TensorDataset``'s second tensor when it is 1-D
    with an integer dtype (float targets may be regression values); a Hugging Face-style column
    ``base[keys.label]`` when ``keys.label`` is in ``base.column_names``; a MONAI-style ``base.data``
    list of dicts whose ``keys.label`` values are all numbers (a path there is a mask, not a class).
    """
    for attr in ("targets", "labels"):
        lab = getattr(base, attr, None)
        if lab is not None and not callable(lab):
            return lab, f"base.{attr}"
    if isinstance(base, TensorDataset) and len(base.tensors) >= 2:
        y = base.tensors[1]
        if y.ndim == 1 and not y.is_floating_point() and not y.is_complex():
            return y, "base.tensors[1]"
    if keys.label is None:
        return None
    columns = getattr(base, "column_names", None)
    if isinstance(columns, (list, tuple)) and keys.label in columns:
        return _plain(base[keys.label]), f"base[{keys.label!r}]"
    records = getattr(base, "data", None)
    if _numeric_records(records, len(base), keys.label):
        return [r[keys.label] for r in records], f"base.data[i][{keys.label!r}]"
    return None


def _plain(values: Any) -> Any:
    """A column of per-sample values with 0-d tensors and numpy scalars made Python numbers.

    Why: a Hugging Face ``Dataset.with_format("torch")`` column iterates as 0-d tensors (and
    ``"numpy"`` as numpy scalars); read one by one they looked like neither numbers nor names.
    Tensors, arrays, Series and Categoricals are returned as they are (they are read whole).
    """
    if isinstance(values, (torch.Tensor, np.ndarray, pd.Series, pd.Categorical, pd.Index, str, bytes)):
        return values
    if not isinstance(values, Sequence):  # a Hugging Face Column or another iterable: read it once
        try:
            values = list(values)
        except TypeError:
            return values
    if not any(isinstance(v, (torch.Tensor, np.generic, np.ndarray)) for v in values):
        return values
    return [_scalar(v) for v in values]


def _scalar(v: Any) -> Any:
    """``v`` as a Python number when it is a one-element tensor or array or a numpy scalar."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, np.ndarray) and v.size == 1:
        return v.item()
    return v.item() if isinstance(v, np.generic) else v


def _columns_held(base: Dataset, metadata: pd.DataFrame | None) -> str:
    """What columns there are, for messages: metadata's, a Hugging Face dataset's, MONAI records' keys."""
    held = [] if metadata is None else [str(c) for c in metadata.columns]
    columns = getattr(base, "column_names", None)
    if isinstance(columns, (list, tuple)):
        held += [str(c) for c in columns]
    records = getattr(base, "data", None)
    if isinstance(records, Sequence) and records and isinstance(records[0], Mapping):
        held += [str(k) for k in records[0]]
    return f"metadata and base have the columns {sorted(set(held))}" if held else \
        "there is no metadata and base has no columns (column_names) or dict records (data)"


def _column(base: Dataset, name: str, metadata: pd.DataFrame | None, n: int) -> tuple[Any, str] | None:
    """One value per sample from the column ``name``: of ``metadata``, of a Hugging Face dataset
    (``base.column_names``), or of MONAI-style ``base.data`` records (a list of dicts)."""
    if metadata is not None and name in metadata.columns:
        return metadata[name], f"metadata column {name!r}"
    columns = getattr(base, "column_names", None)
    if isinstance(columns, (list, tuple)) and name in columns:
        return _plain(base[name]), f"base[{name!r}]"
    records = getattr(base, "data", None)
    if (isinstance(records, Sequence) and not isinstance(records, (str, bytes)) and len(records) == n and n
            and all(isinstance(r, Mapping) and name in r for r in records)):
        return _plain([r[name] for r in records]), f"base.data[i][{name!r}]"
    return None


def _numeric_records(records: Any, n: int, key: str) -> bool:
    """Whether ``records`` is a non-empty list of ``n`` dicts whose ``key`` values are all numbers."""
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)) or len(records) != n or n == 0:
        return False
    return all(isinstance(r, Mapping) and _is_number(r.get(key)) for r in records)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _given_labels(labels: LabelsArg, metadata: pd.DataFrame | None, n: int, base: Dataset) -> tuple[object, str]:
    """Explicit labels: a sequence, a column name (see ``_column``), or a label-only callable ``f(i)``."""
    if isinstance(labels, str):
        found = _column(base, labels, metadata, n)
        if found is None:
            raise ValueError(f"labels={labels!r} names a column, but {_columns_held(base, metadata)}; pass "
                             "metadata=<DataFrame with that column> or the labels themselves")
        return found
    if callable(labels):
        return _plain([labels(i) for i in range(n)]), "labels(i)"
    return _plain(labels), "labels"


class SourceTaggedDataset(Dataset):
    """A map-style dataset whose items are ``(x, y, source_id)``.

    Why: every shiftbn analysis needs to know which lab, hospital or scanner a sample came from.
    ``base[i]`` may return ``x`` (then ``y`` is -1), ``(x, y)``, ``(x, y, source)`` (the base's own
    source is ignored: the tag comes from ``sources``) or a dict such as MONAI and Hugging Face yield,
    ``{"image": x, "label": y, ...}``, read at ``keys`` (an ``ItemKeys``; default input ``"image"``,
    label ``"label"``). An item without a label gets ``labels[i]``, or -1 when the dataset is
    unlabeled. ``sources`` holds one hashable
    label per sample (list, numpy array, tensor, pandas Series or Categorical), or names a column: of
    ``metadata``, of a Hugging Face dataset (``"hospital"``) or of MONAI ``base.data`` records; integer
    ids with ``source_names`` (``source_names[s]`` names id ``s``) keep those names. Names are stored as
    strings in **sorted order** (a Categorical keeps its category order; labels of mixed types
    that cannot be sorted keep first-seen order). ``ds.source_names[s]`` is the name of id ``s``;
    the name -> id map is carried unchanged by ``subset`` and ``split``, so ids stay stable.

    ``labels`` (one class id per sample, -1 = unlabeled): a sequence; the name of a column (as for
    ``sources``); or a cheap label-only callable ``f(i)`` (e.g. reading a table, never decoding an image).
    When not given, they are read without loading items (see ``_infer_labels``): ``base.targets``/
    ``base.labels``, a ``TensorDataset``'s 1-D integer second tensor, a Hugging Face label column or
    MONAI ``base.data`` records. When none is available ``ds.labels`` is None: the dataset is
    unlabeled (statistics work; evaluation refuses until labels are given). Whole-number floats are
    accepted; NaN or fractional labels raise naming their rows. String labels are encoded in sorted
    order and their names become ``class_names`` (items' ``y`` still come from ``base``).
    ``class_names`` (tuple of str or None) names the class ids; ``metadata`` (a DataFrame with one
    row per sample, or None) carries per-sample columns (e.g. a manifest's other columns). Views
    (``take``, ``subset``, ``split``) keep both, and keep the subclass and its other attributes.

    Args:
        base: a map-style dataset (``__len__``/``__getitem__``) of N items.
        sources: one hashable source label per sample (N,); integer ids ``0..S-1`` when
            ``source_names`` is given.
        labels: class ids (N,) (-1 = unlabeled), a ``metadata`` column name, or a label-only
            callable ``f(i)``; ``None`` (default) reads them from ``base`` without loading items.
        source_names: the names of ids ``0..S-1`` when ``sources`` holds integer ids (default: names
            from ``sources`` themselves, sorted).
        class_names: one name per class id (default: none, or the sorted string labels).
        metadata: per-sample columns, one row per sample (default: none).
        keys: the field names of dict items (default ``ItemKeys()``: ``"image"``, ``"label"``).
        source_word: what the data calls a source (``"hospital"``, ``"lab"``; default ``"source"``):
            reports and the terminal title sources with it.

    Returns:
        A ``SourceTaggedDataset`` of N items ``(x, y, source_id)``, with ``source_ids`` (N,) int64,
        ``source_names``, ``labels`` ((N,) int64 or None), ``class_names`` and ``metadata``.

    Raises:
        TypeError: ``base`` is not map-style, or ``keys`` is not an ``ItemKeys``.
        ValueError: not one source (or label, or metadata row) per sample, missing sources, or
            fractional/NaN labels; the message names the rows.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
        >>> ds = SourceTaggedDataset(base, ["lab_b", "lab_a", "lab_b", "lab_a"])
        >>> ds.source_names, ds.source_ids.tolist(), ds.labels.tolist()
        (('lab_a', 'lab_b'), [1, 0, 1, 0], [0, 1, 0, 1])
        >>> x, y, s = ds[1]  # y comes from the base item, s from ``sources``
        >>> int(y), s
        (1, 0)
    """

    source_word: str = "source"

    def __init__(
        self,
        base: Dataset,
        sources: Sequence[Hashable] | np.ndarray | pd.Series,
        labels: LabelsArg = None,
        *,
        source_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        metadata: pd.DataFrame | None = None,
        keys: ItemKeys | None = None,
        source_word: str = "source",
    ) -> None:
        check_dataset(base, "base", "wrap inputs and labels first: SourceTaggedDataset(TensorDataset(x, y), sources) "
                      "(torch.utils.data.TensorDataset; y: one class id per sample)")
        if not isinstance(source_word, str) or not source_word.strip():
            raise ValueError(f"source_word must be a non-empty word for a source, such as 'hospital', "
                             f"got {source_word!r}")
        if not hasattr(base, "__getitem__") or not hasattr(base, "__len__"):
            raise TypeError(f"base must be a map-style dataset with __len__/__getitem__, got {type(base).__name__}")
        if keys is not None and not isinstance(keys, ItemKeys):
            raise TypeError(f"keys must be an ItemKeys, e.g. ItemKeys(input='image', label='label'), got {keys!r}")
        self.keys: ItemKeys = keys if keys is not None else DEFAULT_KEYS
        n = dataset_length(base, "base")
        metadata = _check_metadata(metadata, n)
        if isinstance(sources, str):
            found = _column(base, sources, metadata, n)
            if found is None:
                raise ValueError(f"sources={sources!r} names a column, but {_columns_held(base, metadata)}; name "
                                 "one of them or pass one source label per sample")
            sources = found[0]
        if source_names is None:
            names, ids = _source_order(sources)
        else:
            names = [str(s) for s in source_names]
            ids = _source_ids(sources, len(names))
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} source labels for a dataset of {n} samples; give one per sample")
        self.base = base
        self.source_names: tuple[str, ...] = tuple(names)
        self.source_ids: np.ndarray = ids
        found = _infer_labels(base, self.keys) if labels is None else _given_labels(labels, metadata, n, base)
        self.labels: np.ndarray | None = None
        self.class_names: tuple[str, ...] | None = None
        if found is not None:
            self.labels, self.class_names = encode_labels(found[0], n, class_names, where=found[1])
        elif class_names is not None:
            self.class_names = encode_labels([], 0, class_names)[1]
        self.metadata: pd.DataFrame | None = metadata
        self.source_word = source_word.strip()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_datasets(
        cls,
        datasets: Mapping[str, Dataset],
        *,
        class_names: Sequence[str] | None = None,
        keys: ItemKeys | None = None,
    ) -> SourceTaggedDataset:
        """One dataset per source, e.g. ``{"lab_a": d1, "lab_b": d2}``; source order = sorted names.

        Why: data often comes as one folder or dataset per site; this tags each part with its name.
        Labels are read from every part (see the class docstring) when all parts expose them.

        Args:
            datasets: source name -> map-style dataset (at least one entry).
            class_names: one name per class id (default: none).
            keys: the field names of dict items (``ItemKeys``; default ``ItemKeys()``).

        Returns:
            A ``SourceTaggedDataset`` over the parts concatenated in sorted-name order.

        Raises:
            ValueError: ``datasets`` is empty.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> parts = {"lab_b": TensorDataset(torch.zeros(2, 3), torch.tensor([0, 1])),
            ...          "lab_a": TensorDataset(torch.ones(3, 3), torch.tensor([1, 1, 0]))}
            >>> ds = SourceTaggedDataset.from_datasets(parts)
            >>> ds.source_names, ds.source_ids.tolist(), ds.labels.tolist()
            (('lab_a', 'lab_b'), [0, 0, 0, 1, 1], [1, 1, 0, 0, 1])
        """
        if not datasets:
            raise ValueError("from_datasets needs at least one {name: dataset} entry")
        names = sorted(str(k) for k in datasets)
        by_name = {str(k): v for k, v in datasets.items()}
        parts = [by_name[k] for k in names]
        sources = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(parts)])
        if keys is not None and not isinstance(keys, ItemKeys):
            raise TypeError(f"keys must be an ItemKeys, e.g. ItemKeys(input='image', label='label'), got {keys!r}")
        found = [_infer_labels(d, keys or DEFAULT_KEYS) for d in parts]
        lab = None if any(f is None for f in found) else np.concatenate([np.asarray(f[0]).reshape(-1) for f in found])
        return cls(ConcatDataset(parts), sources, lab, source_names=names, class_names=class_names, keys=keys)

    # --- dataset protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        return self._tagged(self._item(int(i)), int(i))

    def _item(self, i: int) -> Any:
        """``base[i]``; an IndexError inside the length names the base and ``i`` (its ``__len__`` lies)."""
        try:
            return self.base[i]
        except IndexError as e:
            if 0 <= i < len(self) and not isinstance(e, DatasetLengthError):
                raise len_mismatch(self.base, i, len(self), e) from e
            raise

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any, int]]:
        """The items at ``indices`` at once (PyTorch's DataLoader calls this for a whole batch).

        Why: per-item ``__getitem__`` costs a Python call per sample; in-memory bases (``TensorDataset``,
        ``ArrayDataset``, ``Subset``/``ConcatDataset`` of them, any base with ``__getitems__``) are
        indexed in one vectorised step. Items equal ``[self[i] for i in indices]`` bit for bit.
        """
        idx = [int(i) for i in indices]
        try:
            items = gather(self.base, idx)
        except DatasetLengthError:
            raise
        except IndexError:  # find the index at fault, named by ``_item``
            items = None
        if items is None:
            items = [self._item(i) for i in idx]
        if all(type(item) is tuple and len(item) >= 2 and item[1] is not None for item in items):  # no per-item calls
            sids = self.source_ids[np.asarray(idx, dtype=np.int64)].tolist()
            return [(it[0], it[1], s) for it, s in zip(items, sids, strict=True)]
        return [self._tagged(item, i) for item, i in zip(items, idx, strict=True)]

    def _tagged(self, item: Any, i: int) -> tuple[Any, Any, int]:
        """``(x, y, source_id)`` of base item ``item`` at position ``i``; ``labels[i]`` when it has no ``y``."""
        y: Any = ABSENT
        if isinstance(item, (tuple, list, Mapping)):
            x, y, _ = parts_of(item, getattr(self, "keys", DEFAULT_KEYS), "item of base")
        else:
            x = item
        if y is ABSENT:
            labels = getattr(self, "labels", None)
            y = UNLABELED if labels is None else int(labels[i])
        return x, y, int(self.source_ids[i])

    # --- metadata ------------------------------------------------------------------------------
    @property
    def sources_present(self) -> list[str]:
        """Names of the sources that hold at least one sample, in id order."""
        present = np.unique(self.source_ids)
        return [self.source_names[i] for i in present]

    def require_labels(self, what: str = "evaluation") -> np.ndarray:
        """The class ids (N,) int64, or ValueError saying how to give labels to an unlabeled dataset.

        Why: labels are never found by decoding every image (see the class docstring); a dataset built
        without a label accessor is unlabeled, and ``what`` (e.g. "evaluation") must say how to fix that.

        Args:
            what: what needs the labels, for the message (default ``"evaluation"``).

        Returns:
            ``labels``: (N,) int64 class ids (-1 = unlabeled sample).

        Raises:
            ValueError: the dataset has no labels; the message says how to give them.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> ds.require_labels().shape
            (60,)
        """
        if self.labels is None:
            raise ValueError(
                f"{what} needs labels, but this dataset has none (its base exposes no targets/labels); pass "
                "them to SourceTaggedDataset(base, sources, labels=...) as one class id per sample, the name "
                "of a metadata column, or a label-only callable f(i) -> class id"
            )
        return self.labels

    def source_id(self, name: Hashable) -> int:
        """The int id of source ``name``.

        Why: ids index ``source_names`` and stay stable across views; names are what users know.

        Args:
            name: a source name (compared as a string).

        Returns:
            The id (int) with ``source_names[id] == str(name)``.

        Raises:
            ValueError: ``name`` is not a source; the message lists the known ones.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> ds.source_id("lab_2")
            2
        """
        try:
            return self.source_names.index(str(name))
        except ValueError:
            import difflib

            close = difflib.get_close_matches(str(name), [str(s) for s in self.source_names], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown source {name!r}; known sources: {list(self.source_names)}{hint}") from None

    def indices_of(self, name: Hashable) -> np.ndarray:
        """Dataset positions of the samples of source ``name``, in increasing order.

        Why: per-source work (a calibration subset, a per-site batch) starts from these positions.

        Args:
            name: a source name.

        Returns:
            (n_source,) int64 positions in this dataset.

        Raises:
            ValueError: ``name`` is not a source.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> idx = ds.indices_of("lab_1")
            >>> bool((ds.source_ids[idx] == 1).all())
            True
        """
        return np.flatnonzero(self.source_ids == self.source_id(name))

    def counts(self) -> pd.DataFrame:
        """Tidy sample counts per source (and per class when labels are known).

        Why: a source too small for a batch, or missing a class, is the first thing to check.

        Args:
            None.

        Returns:
            A ``pandas.DataFrame`` with columns ``source, label, n`` (``source, n`` when unlabeled),
            one row per (source, class) present, sorted.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> list(ds.counts().columns), int(ds.counts()["n"].sum())
            (['source', 'label', 'n'], 60)
        """
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
        """A view on the samples at ``indices`` (integer positions in this dataset); ids are kept.

        Why: views keep the name -> id map, so statistics of a subset line up with the whole's.
        The view has this dataset's class and attributes; ``source_ids``, ``labels`` and ``metadata``
        rows follow ``indices``. Other per-sample attributes of a subclass are shared, not re-indexed.

        Args:
            indices: (M,) integer positions in ``[0, len(self))``, in the order wanted.

        Returns:
            A ``SourceTaggedDataset`` (same class) of M samples; ``base`` is wrapped, not copied.

        Raises:
            TypeError: non-integer indices (for a boolean mask use ``np.flatnonzero(mask)``).
            IndexError: a position out of range.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> view = ds.take([0, 5, 7])
            >>> len(view), view.source_names == ds.source_names
            (3, True)
        """
        idx = np.asarray(indices).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integer positions, got dtype {idx.dtype}; "
                            "for a boolean mask use np.flatnonzero(mask)")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)})")
        sub = type(self).__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub.base = torch.utils.data.Subset(self.base, idx.tolist())
        sub.source_ids = self.source_ids[idx]
        sub.labels = None if self.labels is None else self.labels[idx]
        sub.metadata = None if self.metadata is None else self.metadata.iloc[idx].reset_index(drop=True)
        return sub

    def subset(self, sources: Sequence[Hashable] | Hashable) -> SourceTaggedDataset:
        """Only the samples of the named ``sources``; ids are kept.

        Why: held-out-source protocols train on some sources and test on others of one dataset.

        Args:
            sources: one source name, or a list of them.

        Returns:
            A ``SourceTaggedDataset`` view (see ``take``) of those sources' samples, in dataset order.

        Raises:
            ValueError: an unknown source name.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> ds.subset(["lab_0", "lab_3"]).sources_present
            ['lab_0', 'lab_3']
        """
        wanted = [sources] if isinstance(sources, (str, int)) else list(sources)
        ids = [self.source_id(s) for s in wanted]
        return self.take(np.flatnonzero(np.isin(self.source_ids, ids)))

    def without_labels(self, sources: Sequence[Hashable] | Hashable) -> SourceTaggedDataset:
        """A view whose samples of ``sources`` carry label -1 (unlabeled); other samples keep theirs.

        Why: a site whose labels are not to be used (not yet trusted, or kept for later) is evaluated
        as an unlabeled site: statistics and label-free indicators, never a label metric.

        Args:
            sources: one source name, or a list of them.

        Returns:
            A ``SourceTaggedDataset`` view (see ``take``) of every sample, those sources' labels -1.

        Raises:
            ValueError: an unknown source name.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> int((ds.without_labels("lab_1").labels == -1).sum()) == int((ds.source_ids == 1).sum())
            True
        """
        wanted = [sources] if isinstance(sources, (str, int)) else list(sources)
        ids = [self.source_id(s) for s in wanted]
        view = self.take(np.arange(len(self)))
        labels = self.require_labels("without_labels") if self.labels is None else self.labels
        view.labels = np.where(np.isin(view.source_ids, ids), UNLABELED, labels).astype(np.int64)
        return view

    def split(
        self,
        by: str = "source",
        fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        seed: int = 0,
    ) -> Splits:
        """Per-source train / calibration / test splits, stratified by class where labels exist.

        Why: AdaBN-style recalibration needs unlabeled calibration data disjoint from the test data.
        Every (source, class) group is shuffled with ``seed`` and cut at ``fractions``.

        Args:
            by: what to split within; only ``"source"``.
            fractions: (train, calibration, test) shares, non-negative, summing to 1.
            seed: seeds the shuffle of each group (same seed, same split).

        Returns:
            ``Splits`` with three disjoint views ``train``, ``calibration``, ``test``.

        Raises:
            ValueError: ``by`` is not ``"source"`` or ``fractions`` are not three shares summing to 1.

        Example:
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> parts = ds.split(fractions=(0.5, 0.25, 0.25), seed=0)
            >>> len(parts.train) + len(parts.calibration) + len(parts.test)
            60
        """
        if by != "source":
            raise ValueError(f"split(by={by!r}) is not supported; use by='source'")
        fr = np.asarray(fractions, dtype=float)
        if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
        rng = np.random.default_rng(seed)
        keys = self.source_ids if self.labels is None else np.stack([self.source_ids, self.labels], axis=1)
        groups = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
        parts: list[list[np.ndarray]] = [[], [], []]
        for g in np.unique(groups):
            members = rng.permutation(np.flatnonzero(groups == g))
            cuts = np.round(np.cumsum(fr)[:2] * len(members)).astype(int)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].append(piece)
        train, cal, test = (self.take(np.sort(np.concatenate(p))) for p in parts)
        return Splits(train=train, calibration=cal, test=test)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, sources={list(self.sources_present)})"


def require_tagged(ds: object, what: str) -> SourceTaggedDataset:
    """``ds`` when it is a ``SourceTaggedDataset``, else TypeError saying how to make one.

    Why: a tensor or plain dataset handed to a per-source verb failed deep inside (a size mismatch,
    a missing attribute); the fix is one wrapper call.
    """
    if not isinstance(ds, SourceTaggedDataset):
        shape = f" of shape {tuple(ds.shape)}" if isinstance(ds, (torch.Tensor, np.ndarray)) else ""
        raise TypeError(f"{what} needs a SourceTaggedDataset (one source per sample), got {type(ds).__name__}{shape}; "
                        "wrap tensors as SourceTaggedDataset(TensorDataset(x, y), sources) and a dataset as "
                        "SourceTaggedDataset(ds, sources)")
    return ds


def _source_ids(sources: Sequence[int] | np.ndarray, n_names: int) -> np.ndarray:
    """Integer source ids given with ``source_names``: each must index a name."""
    sources = _plain(sources)
    if isinstance(sources, torch.Tensor):
        sources = sources.detach().cpu().numpy()
    arr = np.asarray(sources).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"with source_names, sources must be integer ids 0..{n_names - 1}, got dtype {arr.dtype}")
    ids = arr.astype(np.int64)
    bad = (ids < 0) | (ids >= n_names)
    if bad.any():
        raise ValueError(f"source ids {ids[bad][:5].tolist()} at {rows(bad)} fall outside the {n_names} "
                         f"source_names; give ids 0..{n_names - 1} or leave source_names out to use labels")
    return ids


def _check_metadata(metadata: pd.DataFrame | None, n: int) -> pd.DataFrame | None:
    """One row per sample, indexed 0..n-1."""
    if metadata is None:
        return None
    if not isinstance(metadata, pd.DataFrame):
        raise TypeError(f"metadata must be a pandas DataFrame (one row per sample), got {type(metadata).__name__}")
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} rows for a dataset of {n} samples; give one row per sample")
    return metadata.reset_index(drop=True)


@dataclass
class Splits:
    """Three disjoint views of one dataset: ``train``, ``calibration`` (unlabeled use) and ``test``.

    Why: calibration data for recalibration must never overlap the test data (a leak).

    Args:
        train: the training view.
        calibration: the view recalibration may see (its labels unused).
        test: the evaluation view.

    Returns:
        A ``Splits`` holding the three views as attributes of the same names.

    Example:
        >>> parts = sb.load("blobs-labs", n=60, n_features=4).split()
        >>> type(parts.test).__name__, len(parts.train) > len(parts.test)
        ('SourceTaggedDataset', True)
    """

    train: SourceTaggedDataset
    calibration: SourceTaggedDataset
    test: SourceTaggedDataset
