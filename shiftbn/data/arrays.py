"""`ArrayDataset`: in-memory tensors as a map-style dataset with ``targets``."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from shiftbn.data.items import rows_of


class ArrayDataset(Dataset):
    """Images or features held in memory: ``x`` (N, ...) float32, ``targets`` (N,) int64.

    Why: the built-in datasets and tests need a dataset that exposes its labels without loading items.

    Args:
        x: (N, ...) inputs, numpy or torch, converted to float32.
        y: (N,) class ids, converted to int64.

    Returns:
        An ``ArrayDataset`` whose item ``i`` is ``(x[i], int(targets[i]))``.

    Raises:
        ValueError: ``x`` and ``y`` hold different numbers of samples.

    Example:
        >>> data = ArrayDataset(np.zeros((3, 2)), [0, 2, 1])
        >>> x, y = data[1]
        >>> tuple(x.shape), y, data.targets.tolist()
        ((2,), 2, [0, 2, 1])
    """

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> None:
        self.x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        self.targets = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(self.x) != len(self.targets):
            raise ValueError(f"x has {len(self.x)} samples but y has {len(self.targets)}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """``[self[i] for i in indices]`` in one vectorised step (a DataLoader calls it per batch).

        Items are views of one gathered tensor (x: (...), y: int), equal to per-item ones bit for bit.
        """
        idx = np.asarray(indices, dtype=np.int64)
        return list(zip(rows_of(self.x, idx).unbind(0), self.targets[idx].tolist(), strict=True))
