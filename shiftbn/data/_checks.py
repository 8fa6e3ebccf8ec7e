"""Input checks shared by the data builders and the sampler: row lists for messages, counts, labels.

Why: bad input must fail at the boundary with a message naming the offending rows and the fix,
never deep inside numpy/pandas or as a silently wrong number.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

UNLABELED = -1


def rows(mask_or_positions: np.ndarray | Sequence[int], limit: int = 5) -> str:
    """``"rows 2, 5, 9 (0-based)"`` or ``"rows 0, 1, 2, 3, 4 and 95 more (0-based)"`` for messages."""
    arr = np.asarray(mask_or_positions)
    pos = np.flatnonzero(arr) if arr.dtype == bool else arr.reshape(-1)
    shown = ", ".join(str(int(p)) for p in pos[:limit])
    more = f" and {len(pos) - limit} more" if len(pos) > limit else ""
    return f"row{'s' if len(pos) > 1 else ''} {shown}{more} (0-based)"


def as_count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``; numpy integers welcome, floats/bools/strings refused."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def encode_labels(
    values: object,
    n: int,
    class_names: Sequence[str] | None = None,
    where: str = "labels",
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Class ids (N,) int64 and class names for one label per sample.

    Why: labels arrive as ints, integral floats, strings or Categoricals; fractional or missing
    labels used to be truncated or turned into -2**63 silently. Strings are encoded in sorted order
    (a Categorical keeps its category order) and their names returned; -1 marks an unlabeled sample.
    ``where`` names the input in messages (e.g. "base.targets", "manifest m.csv, column 'label'").
    """
    names = _check_class_names(class_names)
    arr, cat_names = _as_array(values)
    if len(arr) != n:
        raise ValueError(f"got {len(arr)} {where} for a dataset of {n} samples; give one label per sample")
    missing = _missing(arr)
    if missing.any():
        raise ValueError(
            f"{where}: {int(missing.sum())} missing label(s) (NaN/None) at {rows(missing)}; fill them in or "
            f"drop those samples (write -1 for a deliberately unlabeled sample)"
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), names
    if cat_names is not None or arr.dtype.kind in "USO":  # object arrays of numbers became numeric above
        return _encode_strings(arr, cat_names, names, where)
    ids = _integral(arr, where)
    bad = ids < UNLABELED
    if bad.any():
        raise ValueError(f"{where}: negative label(s) {ids[bad][:5].tolist()} at {rows(bad)}; labels are class "
                         "ids 0..K-1, with -1 for an unlabeled sample")
    if names is not None and ids.size and ids.max() >= len(names):
        raise ValueError(f"{where}: label {int(ids.max())} has no name among the {len(names)} class_names {names}; "
                         "give one name per class id")
    return ids, names


def _check_class_names(class_names: Sequence[str] | None) -> tuple[str, ...] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence | np.ndarray | pd.Index):
        raise TypeError(f"class_names must be a sequence of names (one per class id), got {class_names!r}")
    names = tuple(str(c) for c in class_names)
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names}")
    return names


def _as_array(values: object) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A 1-D numpy array, plus the category names when ``values`` is categorical."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        values = pd.Categorical(values)
    if isinstance(values, pd.Categorical):
        arr = np.asarray(values.astype(object), dtype=object)
        return arr.reshape(-1), tuple(str(c) for c in values.categories)
    if isinstance(values, (pd.Series, pd.Index)):
        values = values.to_numpy()
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    if arr.dtype == object and arr.size and not _all_str(arr.reshape(-1)) and _all_numbers(arr.reshape(-1)):
        arr = np.asarray(arr.tolist())  # a list of ints/floats: let numpy pick int64 or float64
    return arr.reshape(-1), None


def _all_str(arr: np.ndarray) -> bool:
    return all(isinstance(v, str) for v in arr)


def _all_numbers(arr: np.ndarray) -> bool:
    return all(isinstance(v, numbers.Number) and not isinstance(v, (bool, np.bool_)) for v in arr)


def _missing(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind in "iub":
        return np.zeros(len(arr), dtype=bool)
    if arr.dtype.kind in "fc":
        return np.isnan(arr)
    return np.asarray(pd.isna(pd.Series(arr, dtype=object)), dtype=bool)


def _encode_strings(
    arr: np.ndarray, cat_names: tuple[str, ...] | None, names: tuple[str, ...] | None, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    if arr.dtype == object and not _all_str(arr) and cat_names is None:
        odd = np.array([not isinstance(v, str) for v in arr])
        raise TypeError(f"{where}: labels mix names (strings) and other values, e.g. {arr[odd][:3].tolist()} at "
                        f"{rows(odd)}; give every sample a class id (int) or every sample a class name")
    text = arr.astype(str)
    if names is None:
        names = cat_names if cat_names is not None else tuple(str(u) for u in np.unique(text))
    lookup = {name: i for i, name in enumerate(names)}
    ids = np.fromiter((lookup.get(t, -2) for t in text), dtype=np.int64, count=len(text))
    unknown = ids == -2
    if unknown.any():
        raise ValueError(f"{where}: label(s) {sorted(set(text[unknown].tolist()))[:5]} at {rows(unknown)} are not "
                         f"among class_names {names}; add them to class_names or fix the labels")
    return ids, names


def _integral(arr: np.ndarray, where: str) -> np.ndarray:
    """int64 ids from an integer, bool or float array; fractional or infinite values refused."""
    if arr.dtype.kind in "iub":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{where}: label {arr.max()} does not fit in int64; labels are class ids 0..K-1")
        return arr.astype(np.int64)
    if arr.dtype.kind != "f":
        raise TypeError(f"{where}: labels must be class ids (ints) or class names (strings), got dtype {arr.dtype}")
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) > 2**53)
    if bad.any():
        raise ValueError(
            f"{where}: label(s) {arr[bad][:5].tolist()} at {rows(bad)} are not whole numbers; labels are class "
            "ids 0..K-1 (round or map them to classes yourself if that is what you mean)"
        )
    return arr.astype(np.int64)


def check_dataset(data: object, what: str, wrap: str) -> None:
    """Refuse, up front, inputs that are not map-style datasets but would fail deep inside a pass.

    Why: a tensor or array passed where a dataset is expected was iterated row by row and failed
    much later with a size mismatch; an ``IterableDataset`` cannot be planned by index. ``what``
    names the argument (e.g. "collect_stats data"); ``wrap`` says how to make the dataset.
    """
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{what} is a {type(data).__name__} of shape {tuple(data.shape)}, not a dataset; {wrap}")
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError(f"{what} is an IterableDataset ({type(data).__name__}), which cannot be read by index; "
                        f"give a map-style dataset (__len__/__getitem__), or {wrap}")
