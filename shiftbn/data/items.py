"""Reading items and batches of any shape: tensors, ``(x, y[, source])`` tuples, MONAI/Hugging Face dicts.

Why: user pipelines yield ``x``, ``(x, y)``, ``(x, y, site)`` or ``{"image": x, "label": y, "site": s}``;
one reader for all of them keeps datasets, ``collect_stats`` and evaluation in agreement.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

ABSENT: Any = None
"""What ``parts_of`` returns for a label or source the item or batch does not carry."""


@dataclass(frozen=True)
class ItemKeys:
    """The keys of dict items and batches: ``input`` (required), ``label`` and ``source`` (optional).

    Why: MONAI and Hugging Face datasets yield dicts such as ``{"image": x, "label": y, "site": s}``;
    the names differ between projects, so they are configurable. ``label=None``/``source=None`` never
    read a label/source.

    Args:
        input: the key of the inputs (default ``"image"``).
        label: the key of the class id, or ``None`` (default ``"label"``).
        source: the key of the source, or ``None`` (default ``"source"``).

    Returns:
        A frozen ``ItemKeys`` to pass as ``keys=`` (``SourceTaggedDataset``, ``CollectOptions``).

    Raises:
        TypeError: a key that is not a non-empty string (or ``None`` for ``label``/``source``).

    Example:
        >>> keys = ItemKeys(input="img", label="tumor", source="site")
        >>> ds = SourceTaggedDataset([{"img": torch.zeros(2), "tumor": 1}], ["s0"], keys=keys)
        >>> ds[0][1:]
        (1, 0)
    """

    input: str = "image"
    label: str | None = "label"
    source: str | None = "source"

    def __post_init__(self) -> None:
        for field in ("input", "label", "source"):
            value = getattr(self, field)
            if value is None and field != "input":
                continue
            if not isinstance(value, str) or not value:
                raise TypeError(f"ItemKeys.{field} must be a non-empty string (a dict key)"
                                f"{'' if field == 'input' else ' or None'}, got {value!r}")


DEFAULT_KEYS = ItemKeys()


def parts_of(obj: Mapping | Sequence, keys: ItemKeys, what: str = "item") -> tuple[Any, Any, Any]:
    """``(x, y, source)`` of a dict or tuple item/batch; ``ABSENT`` (None) for a part it lacks.

    A tuple/list is ``(x,)``, ``(x, y)`` or ``(x, y, source, ...)``; a dict is read at ``keys``.
    ``what`` names the object in messages ("item", "batch"). Raises ValueError for an empty tuple or
    a dict without ``keys.input``, naming the keys it has and the keyword to set.
    """
    if isinstance(obj, Mapping):
        if keys.input not in obj:
            raise ValueError(
                f"a dict {what} has keys {sorted(map(str, obj))} but no input key {keys.input!r}; name the key "
                f"of the inputs with keys=ItemKeys(input=...), e.g. ItemKeys(input={_guess(obj)!r})"
            )
        y = obj.get(keys.label, ABSENT) if keys.label is not None else ABSENT
        s = obj.get(keys.source, ABSENT) if keys.source is not None else ABSENT
        return obj[keys.input], y, s
    if len(obj) == 0:
        raise ValueError(f"an empty {type(obj).__name__} {what} holds no inputs; yield x, (x, y), (x, y, source) "
                         "or a dict with an input key")
    return obj[0], obj[1] if len(obj) >= 2 else ABSENT, obj[2] if len(obj) >= 3 else ABSENT


def _guess(obj: Mapping) -> str:
    """The first key holding a tensor-like value (for the hint in messages), else the first key."""
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) or hasattr(v, "__array__"):
            return str(k)
    return str(next(iter(obj), "image"))


def gather(base: Any, indices: list[int]) -> list[Any] | None:
    """``[base[i] for i in indices]`` in one vectorised step where ``base`` allows it, else None.

    Why: a DataLoader that calls ``__getitem__`` once per sample spends most of its time in Python
    for in-memory data. Handles ``TensorDataset``, ``Subset`` and ``ConcatDataset`` of such datasets,
    and any dataset with its own ``__getitems__``. Items equal per-item indexing bit for bit (views of
    one gathered tensor per field), so ``default_collate`` builds the same batch.
    """
    if isinstance(base, Subset) and _own(base, Subset):
        mapped = [int(base.indices[i]) for i in indices]
        found = gather(base.dataset, mapped)
        return found if found is not None else [base.dataset[i] for i in mapped]
    if isinstance(base, TensorDataset) and _own(base, TensorDataset):
        idx = np.asarray(indices, dtype=np.int64)
        return list(zip(*(rows_of(t, idx).unbind(0) for t in base.tensors), strict=True))
    if isinstance(base, ConcatDataset) and _own(base, ConcatDataset):
        return _gather_concat(base, indices)
    fetch = getattr(base, "__getitems__", None)
    if callable(fetch):
        return list(fetch(indices))
    return None


def _own(base: Any, cls: type) -> bool:
    """Whether ``base`` reads items as ``cls`` does: a subclass with its own ``__getitem__`` (e.g. a
    ``TensorDataset`` whose items add a target) must be read item by item, never as ``cls``'s tensors."""
    return type(base).__getitem__ is cls.__getitem__


def rows_of(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """``t[idx]`` (rows ``idx`` (B,) int64 of ``t`` (N, ...)) as one new tensor, bit for bit.

    Why numpy for CPU tensors: torch's gather kernels split a batch-sized copy over threads, and on a
    busy machine waiting for those threads cost ~10 ms a batch (measured), more than per-item reads.
    """
    if t.device.type == "cpu" and not t.requires_grad:
        try:
            return torch.from_numpy(t.numpy()[idx])
        except (TypeError, RuntimeError):  # dtypes numpy lacks (bfloat16), conjugate/negative views
            pass
    return t.index_select(0, torch.as_tensor(idx, device=t.device))


def _gather_concat(base: ConcatDataset, indices: list[int]) -> list[Any]:
    """Per-part gathers of a ``ConcatDataset``, put back in the order of ``indices``."""
    where: dict[int, list[tuple[int, int]]] = {}
    for pos, i in enumerate(indices):
        if i < 0:
            i += len(base)
        part = bisect.bisect_right(base.cumulative_sizes, i)
        local = i - (base.cumulative_sizes[part - 1] if part else 0)
        where.setdefault(part, []).append((pos, local))
    out: list[Any] = [None] * len(indices)
    for part, slots in where.items():
        ds = base.datasets[part]
        local = [j for _, j in slots]
        found = gather(ds, local)
        items = found if found is not None else [ds[j] for j in local]
        for (pos, _), item in zip(slots, items, strict=True):
            out[pos] = item
    return out
