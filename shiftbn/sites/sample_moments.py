"""Per-sample moments of every BN layer's input, from one eval-mode pass (with the model's outputs).

Why: in eval mode a BN input depends on its own sample only, so the exact moments of any batch drawn
from a set of samples follow from per-sample moments; a drift monitor can then draw its null batches
of any size without another forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shiftbn._forward import Forward, Runner
from shiftbn._torch import Inputs, autocast, device_of, iter_inputs
from shiftbn.bn import BNLayer, bn_layers, preserved, site_key
from shiftbn.bn.hooks import observe_bn_inputs


@dataclass
class SampleMoments:
    """Per BN call site: ``mean`` and ``sq`` (N, C) float64, each sample's spatial mean of x and of x^2;
    ``depth``: the site's order of first call; ``logits``: the model's outputs (N, K) float32, or (N, 0) when
    they are dense (a segmenter's (N, K, ...) logits are never kept: the monitor reads BN statistics only)."""

    mean: dict[str, np.ndarray]
    sq: dict[str, np.ndarray]
    depth: dict[str, int]
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.logits)

    def batch_moments(self, layer: str, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population variance (B, C) of the batches given by ``weights`` (B, N): sample counts
        (a bootstrap draw) or 0/1 membership; each row's samples pooled with equal spatial size."""
        w = np.asarray(weights, np.float64)
        total = w.sum(axis=1, keepdims=True)
        mean = (w @ self.mean[layer]) / total
        var = np.maximum((w @ self.sq[layer]) / total - mean**2, 0.0)
        return mean, var


@torch.no_grad()
def sample_moments(model: nn.Module, data: Inputs, *, batch_size: int = 256, amp: bool = False,
                   forward: Forward | None = None) -> SampleMoments:
    """One pass of ``model`` in eval mode (stored statistics) over ``data`` (a tensor (N, ...) or a dataset):
    every BN layer's input reduced to per-sample, per-channel spatial means of x and x^2 (float64).

    A module called k > 0 times more in one forward gets keys ``"<name>@<k>"`` for its later calls.
    The model is restored bit for bit afterwards. ``forward``: the user's ``forward(model, x)`` (default
    ``model(x)``). Outputs of more than two dimensions (dense: a logit per voxel) are not kept.
    """
    n = len(data)
    if n == 0:
        raise ValueError("no samples: the data is empty")
    layers = bn_layers(model)
    parts: dict[str, list] = {}
    sqs: dict[str, list] = {}
    depth: dict[str, int] = {}

    def record(layer: BNLayer, k: int, x: torch.Tensor) -> None:
        key = layer.name if k == 0 else site_key(layer.name, k)
        depth.setdefault(key, len(depth))
        flat = x.detach().to(torch.float64).reshape(x.shape[0], x.shape[1], -1)
        parts.setdefault(key, []).append(flat.mean(dim=2).cpu().numpy())
        sqs.setdefault(key, []).append(flat.square().mean(dim=2).cpu().numpy())

    device = device_of(model)
    runner = Runner(forward=forward)
    logits = []
    with preserved(model):
        model.eval()
        with observe_bn_inputs(model, layers, record):
            chunks = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
            with autocast(device, amp):
                for x in iter_inputs(data, chunks):
                    out = runner.outputs(model, x, device)
                    logits.append(out.float().cpu() if out.ndim == 2 else out.new_zeros((len(out), 0)).float().cpu())
    mean = {k: np.concatenate(v) for k, v in parts.items()}
    sq = {k: np.concatenate(v) for k, v in sqs.items()}
    return SampleMoments(mean, sq, depth, torch.cat(logits).numpy())
