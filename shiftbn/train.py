"""A small sampler-aware trainer for demos, tests and the protocols."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.samplers import SourceBatchSampler


def train(
    model: nn.Module,
    ds: SourceTaggedDataset,
    *,
    steps: int = 300,
    batch_size: int = 32,
    mode: str = "random",
    sources_per_batch: int | None = None,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Train ``model`` in place with SGD for ``steps`` steps on batches built by ``SourceBatchSampler``.

    Why: the composition of training batches (``mode``: random | single | mixed) is the variable the
    batch-composition studies change. Cross-entropy on integer labels; the model is left in train
    mode. Returns a tidy DataFrame ``step, epoch, loss, accuracy`` (batch accuracy, BN in train mode).
    """
    if ds.labels is None:
        raise ValueError("training needs labels; the dataset has none")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sampler = SourceBatchSampler(ds.source_ids, batch_size, mode, sources_per_batch=sources_per_batch,
                                 drop_last=True, seed=seed)
    loader = DataLoader(ds, batch_sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    device = next(model.parameters()).device
    model.train()
    rows, step, epoch = [], 0, 0
    with tqdm(total=steps, desc="train", disable=not progress, leave=False) as bar:
        while step < steps:
            sampler.set_epoch(epoch)
            for x, y, _ in loader:
                x, y = x.to(device), torch.as_tensor(y, device=device)
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                acc = (logits.argmax(1) == y).float().mean().item()
                rows.append((step, epoch, loss.item(), acc))
                step += 1
                bar.update(1)
                if step >= steps:
                    break
            epoch += 1
    return pd.DataFrame(rows, columns=["step", "epoch", "loss", "accuracy"])


@torch.no_grad()
def predict(model: nn.Module, ds, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) float32 and labels (N,) of a dataset in order, with the model as it is."""
    device = next(model.parameters()).device
    outs, ys = [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        outs.append(model(batch[0].to(device)).float().cpu())
        ys.append(torch.as_tensor(batch[1]))
    return torch.cat(outs).numpy(), torch.cat(ys).numpy()
