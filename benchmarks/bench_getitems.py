"""Batched indexing (``__getitems__``) against per-item ``__getitem__`` through a DataLoader.

20,000 samples of 1x28x28, batch 256, one pass, best of ``--repeats`` runs (the machine is shared).
Run: ``PYTHONPATH=. python benchmarks/bench_getitems.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import shiftbn as sb
from shiftbn.data import ArrayDataset


class PerItem(Dataset):
    """The same dataset without ``__getitems__``: the DataLoader calls ``__getitem__`` per sample."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def _best(ds: Dataset, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in DataLoader(ds, batch_size=256):
            pass
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(a.n, 1, 28, 28, generator=g), np.arange(a.n) % 10
    bases = {"ArrayDataset": ArrayDataset(x, y), "TensorDataset": TensorDataset(x, torch.as_tensor(y))}
    for name, base in bases.items():
        ds = sb.SourceTaggedDataset(base, np.arange(a.n) % 3)
        for view, d in (("full", ds), ("take", ds.take(np.arange(0, a.n, 2)))):
            slow, fast = _best(PerItem(d), a.repeats), _best(d, a.repeats)
            print(f"{name:14s} {view:5s} per-item {slow * 1e3:7.1f} ms  batched {fast * 1e3:7.1f} ms  "
                  f"speed-up {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()
