"""Bottom-layer inference helpers every module may import: device, batched forwards, input stacking.

Why: evaluation, strategies, protocols and training all run a model over a tensor in batches; one
copy of that loop (and of the prediction-time BN forward) keeps them consistent. Imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def forward_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Outputs of ``model`` on ``x`` (N, ...) in batches of ``batch_size``, as it is; float32 (N, K) on CPU."""
    device = device_of(model)
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


@contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every BN module normalizes with the statistics of its current batch and updates no buffer.

    BN in training mode with ``track_running_stats`` off uses batch statistics and leaves the
    running buffers alone; every other module is in eval mode. All flags are restored on exit.
    """
    flags = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, training, track in flags:
            m.training = training
            if track is not None:
                m.track_running_stats = track


@torch.no_grad()
def batch_stats_logits(model: nn.Module, x: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """Outputs with every BN layer normalizing each batch by its own statistics (prediction-time BN).

    Samples of ``x`` (N, ...) are shuffled with ``seed`` into near-equal batches of at most
    ``batch_size`` (never one sample alone when avoidable); outputs (N, K) float32 come back in the
    original order. The model is left as it was (flags restored, buffers never written).
    """
    if len(x) < 2:
        raise ValueError("prediction-time batch statistics need at least 2 samples")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    chunks = torch.tensor_split(order, max(1, -(-len(x) // batch_size)))
    with _batch_statistics(model):
        parts = [forward_batches(model, x[idx], len(idx)) for idx in chunks]
    out = torch.empty((len(x), *parts[0].shape[1:]))
    for idx, p in zip(chunks, parts, strict=True):
        out[idx] = p
    return out


def stack_inputs(ds: torch.utils.data.Dataset, batch_size: int = 512) -> torch.Tensor:
    """All inputs (first item element) of a map-style dataset stacked into one tensor (N, ...), in order."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    parts = [b[0] if isinstance(b, (tuple, list)) else b for b in loader]
    if not parts:
        raise ValueError("dataset is empty")
    return torch.cat(parts)
