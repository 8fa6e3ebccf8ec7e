"""A small sampler-aware trainer for demos, tests and the protocols."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from shiftbn._log import bars_wanted
from shiftbn._torch import device_of
from shiftbn.data.tagged import SourceTaggedDataset, require_tagged
from shiftbn.samplers import SourceBatchSampler
from shiftbn.studies.ghost import ghost_norm, ghost_ready


def train(
    model: nn.Module,
    ds: SourceTaggedDataset,
    *,
    steps: int = 300,
    batch_size: int = 32,
    mode: str = "random",
    sources_per_batch: int | None = None,
    groups: np.ndarray | None = None,
    ghost_batch: int | None = None,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    callback: Callable[[int, nn.Module], None] | None = None,
    every: int = 0,
    progress: bool = True,
    dice_weight: float = 1.0,
) -> pd.DataFrame:
    """Train ``model`` in place with SGD (cosine schedule) for ``steps`` steps; cross-entropy.

    Why: the composition of training batches is the variable the batch studies change.
    ``mode``/``sources_per_batch``: ``SourceBatchSampler`` over the dataset's sources, or over
    ``groups`` (one int per sample, e.g. labels to build one-class batches). ``ghost_batch``: BN
    normalizes over sub-batches of this size while SGD uses the whole batch (normalization batch
    size, paper Section 4). ``callback(step, model)`` runs every ``every`` steps and at the end
    (the model is in train mode again afterwards). Returns a tidy DataFrame
    ``step, epoch, loss, accuracy`` (batch accuracy with BN in train mode).

    Segmentation (a dataset whose targets are label maps, or ``{"mask": ...}`` dicts, and logits
    (B, K, *S)): the loss is per-voxel cross-entropy + ``dice_weight`` x (1 - soft Dice), the soft
    Dice averaged over the foreground classes of the batch (V-Net style, so a small lesion weighs as
    much as the background does not); ``accuracy`` is the voxel accuracy. ``dice_weight=0``: plain
    cross-entropy.
    """
    require_tagged(ds, "train")
    segmentation = ds.labels is None and _segmentation(ds)
    if ds.labels is None and not segmentation:
        raise ValueError("training needs labels (class ids) or label maps (segmentation); the dataset has none")
    if isinstance(dice_weight, bool) or not isinstance(dice_weight, (int, float)) or not dice_weight >= 0:
        raise ValueError(f"dice_weight must be a number >= 0 (0: cross-entropy alone), got {dice_weight!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if ghost_batch is not None and not 2 <= ghost_batch <= batch_size:
        raise ValueError(f"ghost_batch must lie in [2, batch_size={batch_size}], got {ghost_batch}")
    ids = ds.source_ids if groups is None else np.asarray(groups, dtype=np.int64)
    sampler = SourceBatchSampler(ids, batch_size, mode, sources_per_batch=sources_per_batch, drop_last=True,
                                 seed=seed)
    if len(sampler) == 0:
        raise ValueError(_no_batch_message(ids, batch_size, mode))
    loader = DataLoader(ds, batch_sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    device = device_of(model)
    # one call with BN over groups gives what one call per ghost batch gives, for the models ghost_ready knows
    grouped = ghost_batch is not None and ghost_batch < batch_size and ghost_ready(model)
    model.train()
    rows, step, epoch = [], 0, 0
    with tqdm(total=steps, desc="train", disable=not bars_wanted(progress)) as bar:
        while step < steps:
            sampler.set_epoch(epoch)
            before = step
            for x, y, _ in loader:
                y = y["mask"] if isinstance(y, Mapping) else y
                x, y = x.to(device), torch.as_tensor(y, device=device).long()
                if grouped and len(x) % ghost_batch == 0:
                    with ghost_norm(model, ghost_batch):
                        logits = model(x)
                else:
                    chunks = range(0, len(x), ghost_batch or len(x))
                    logits = torch.cat([model(x[i : i + (ghost_batch or len(x))]) for i in chunks])
                loss = nn.functional.cross_entropy(logits, y)
                if segmentation and dice_weight:
                    loss = loss + dice_weight * _soft_dice_loss(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                rows.append((step, epoch, loss.item(), (logits.argmax(1) == y).float().mean().item()))
                step += 1
                bar.update(1)
                if callback is not None and every and step % every == 0 and step < steps:
                    callback(step, model)
                    model.train()
                if step >= steps:
                    break
            if step == before:  # an epoch without a batch would repeat forever
                raise ValueError(f"epoch {epoch}: " + _no_batch_message(ids, batch_size, mode))
            epoch += 1
    if callback is not None:
        callback(step, model)
        model.train()
    return pd.DataFrame(rows, columns=["step", "epoch", "loss", "accuracy"])


def _segmentation(ds: SourceTaggedDataset) -> bool:
    from shiftbn.evaluate.task import infer_task

    return infer_task(ds) == "segmentation"


def _soft_dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of the softmax against one-hot ``y``, summed over the batch's voxels, mean over the
    foreground classes (classes 1..K-1); a class absent from both scores 1 (eps-smoothed)."""
    k = logits.shape[1]
    prob = logits.float().softmax(1)
    onehot = nn.functional.one_hot(y, k).movedim(-1, 1).to(prob.dtype)
    dims = (0, *range(2, prob.ndim))
    inter = (prob * onehot).sum(dims)[1:]
    total = (prob + onehot).sum(dims)[1:]
    eps = 1.0
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def _no_batch_message(ids: np.ndarray, batch_size: int, mode: str) -> str:
    """Why no training batch exists and what to change: names the split size and the batch size."""
    return (f"the training split has {len(ids)} samples but batch_size={batch_size}: mode {mode!r} drops "
            f"incomplete batches, so there is no training batch; use batch_size <= {max(len(ids), 1)} or more "
            "training data")
