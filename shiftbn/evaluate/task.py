"""Which task a dataset's targets describe: classification (a class id per sample), regression (a float value or
vector per sample) or segmentation (a label map per sample), read from the items themselves.

Why: a segmenter's dataset needs no extra argument to be scored per case with Dice; ``task=`` settles the
ambiguous cases (an integer-valued regression target, a one-pixel map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from shiftbn.data._checks import UNLABELED

Task = Literal["classification", "regression", "segmentation"]
TASKS: tuple[str, ...] = ("classification", "regression", "segmentation")
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "regression": ("mae",),
    "segmentation": ("dice", "hd95"),
}


def check_task(task: str | None) -> str | None:
    """``task`` if it is None or one of ``TASKS``; else a ``ValueError`` naming the choices."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} (or None: read from the targets), got {task!r}")
    return task


def target_task(y: Any) -> str | None:
    """The task one item's target ``y`` implies, or ``None`` when it is unlabeled (``-1``) or absent.

    Args:
        y: an item's target: an int class id, a float value, a label map tensor (or a dict with ``"mask"``).

    Returns:
        ``"classification"``, ``"regression"``, ``"segmentation"`` or ``None``.

    Example:
        >>> target_task(3), target_task(0.5), target_task(torch.zeros(4, 4, dtype=torch.long)), target_task(-1)
        ('classification', 'regression', 'segmentation', None)
    """
    if isinstance(y, Mapping):
        return "segmentation" if "mask" in y else None
    if isinstance(y, (torch.Tensor, np.ndarray)):
        arr = y if isinstance(y, np.ndarray) else y.detach().cpu().numpy()
        if arr.ndim == 0:
            y = arr.item()
        elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            return "segmentation" if arr.ndim >= 1 and arr.size > 1 else "classification"
        else:
            return "regression"
    if isinstance(y, (bool, np.bool_)):
        return "classification"
    if isinstance(y, (int, np.integer)):
        return None if int(y) == UNLABELED else "classification"
    if isinstance(y, (float, np.floating)):
        return "regression"
    return None


def infer_task(ds: Any, task: str | None = None) -> str:
    """The task of a ``SourceTaggedDataset``: ``task`` when given, else classification when the dataset holds
    class ids (``labels``), else what the target of the first item of a source implies (one item per source
    is read, until one is labeled).

    Args:
        ds: a ``SourceTaggedDataset``.
        task: an explicit task, or ``None``.

    Returns:
        One of ``TASKS``.

    Raises:
        ValueError: ``task`` is not one of ``TASKS``.

    Example:
        >>> infer_task(sb.load("blobs-labs", n=20, n_features=4))
        'classification'
    """
    if check_task(task) is not None:
        return task
    if getattr(ds, "labels", None) is not None:
        return "classification"
    ids = getattr(ds, "source_ids", None)
    firsts = range(min(len(ds), 1)) if ids is None else np.unique(np.asarray(ids), return_index=True)[1]
    for i in sorted(int(i) for i in firsts):  # one item per source: an unlabeled source's says nothing
        found = target_task(ds[i][1])
        if found is not None:
            return found
    return "classification"
