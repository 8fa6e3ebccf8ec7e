"""Evaluation mini-batches built like training's normalization batches, and outputs per given batch.

Why: comparing "mini-batch statistics at test" with training (paper Sections 4 and 6) is only fair
when the test batches have the training batches' size, sampling and source mix. Training's ghost
batches are consecutive chunks of exactly ``size`` samples of a uniformly shuffled SGD batch;
``exact_batches`` builds test batches the same way (every batch exactly ``size`` samples).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from shiftbn.bn.batchstats import batch_stats_logits
from shiftbn.studies.ghost import ghost_norm, ghost_ready


def exact_batches(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Index batches covering ``range(n)`` once, each of exactly ``size`` samples, drawn uniformly.

    A seeded permutation is cut into ``n // size`` batches; the ``n % size`` samples left over form
    one more batch, topped up with ``size - n % size`` other samples drawn without replacement (their
    outputs are discarded: ``outputs_of_batches`` keeps the first output of every sample).
    Returns a list of int64 arrays of length ``size``. Needs ``2 <= size <= n``.
    """
    if not 2 <= size <= n:
        raise ValueError(f"batch size must lie in [2, n={n}] (BN needs two samples), got {size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    full = n // size * size
    batches = list(order[:full].reshape(-1, size))
    if full < n:
        rest = order[full:]
        filler = rng.choice(order[:full], size=size - len(rest), replace=False)
        batches.append(np.concatenate([rest, filler]))
    return batches


def outputs_of_batches(model: nn.Module, x: torch.Tensor, batches: Sequence[np.ndarray]) -> torch.Tensor:
    """Outputs (N, K) of ``x`` (N, ...) with BN normalizing each of ``batches`` by its own statistics.

    Each sample's output comes from the first batch that holds it (top-up samples are ignored); every
    sample must be in some batch. The model is left as it was (``batch_stats_logits`` per batch).
    """
    n = len(x)
    sizes = {len(b) for b in batches}
    if len(sizes) == 1 and ghost_ready(model):
        return _grouped_outputs(model, x, [np.asarray(b, dtype=np.int64) for b in batches], sizes.pop())
    out: torch.Tensor | None = None
    seen = np.zeros(n, dtype=bool)
    for idx in batches:
        idx = np.asarray(idx, dtype=np.int64)
        part = batch_stats_logits(model, x[torch.from_numpy(idx)], len(idx), 0)
        if out is None:
            out = torch.empty((n, *part.shape[1:]))
        new = ~seen[idx]
        # batch_stats_logits returns outputs in input order (it undoes its own shuffle)
        out[torch.from_numpy(idx[new])] = part[torch.from_numpy(np.flatnonzero(new))]
        seen[idx] = True
    if out is None or not seen.all():
        raise ValueError(f"{int((~seen).sum())} of {n} samples are in no batch; every sample needs one")
    return out


@torch.no_grad()
def _grouped_outputs(model: nn.Module, x: torch.Tensor, batches: list[np.ndarray], size: int) -> torch.Tensor:
    """``outputs_of_batches`` in a few calls: the batches stacked in order and normalized group by group
    (``ghost_norm``) on a copy of the model (BN in training mode, every other layer in eval mode), so
    the model's buffers and flags are not touched; per batch this is what ``batch_stats_logits`` gives."""
    n = len(x)
    order = np.concatenate(batches)
    seen = np.zeros(n, dtype=bool)
    seen[order] = True
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} of {n} samples are in no batch; every sample needs one")
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    step = max(1, 4096 // size) * size
    with ghost_norm(net, size):
        parts = [net(x[torch.from_numpy(order[i:i + step])]) for i in range(0, len(order), step)]
    stacked = torch.cat(parts).float()
    # the first output of every sample, as the loop keeps it
    _, first = np.unique(order, return_index=True)
    out = torch.empty((n, *stacked.shape[1:]))
    out[torch.from_numpy(order[first])] = stacked[torch.from_numpy(first)]
    return out
