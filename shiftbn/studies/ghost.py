"""Ghost batch normalization in one forward pass: BN normalizes consecutive groups of a batch separately.

Why: the normalization-batch study (paper Section 4) trains with BN over ghost batches of 2..256
samples at a fixed SGD batch. Calling the model once per ghost batch costs a Python round trip per
group and layer (64x slower than one call at ghost size 2); reshaping each BN input to
(groups, size, C, ...) gives the same numbers in one call, for models whose other layers treat
every sample on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shiftbn.studies.models import MLP, SmallCNN, SmallResNet, _Block

# Modules known to process every sample independently (no batch coupling besides BN itself).
_PER_SAMPLE = (nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.Flatten, nn.Identity,
               nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, MLP, SmallCNN, SmallResNet, _Block)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def ghost_ready(model: nn.Module) -> bool:
    """Whether ``ghost_norm`` gives ``model`` exactly what one call per ghost batch gives: every module is
    a plain BN layer or a layer known to treat each sample on its own (custom modules: False)."""
    return all(type(m) in _BN or type(m) in _PER_SAMPLE for m in model.modules())


@contextmanager
def ghost_norm(model: nn.Module, size: int) -> Iterator[None]:
    """While active, each BN layer of ``model`` in training mode normalizes consecutive groups of ``size``
    samples of its input separately, as if the model were called once per group.

    Running statistics are updated once per group, in order (``num_batches_tracked`` grows by the number
    of groups), as separate calls would. The input's batch must be a multiple of ``size``. BN layers in
    eval mode are unchanged. The layers' own ``forward`` is back on exit, also on errors.

    Raises:
        ValueError: ``size`` < 2, or a model ``ghost_ready`` refuses.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"ghost size must be an int >= 2 (BN needs two samples per group), got {size!r}")
    if not ghost_ready(model):
        raise ValueError("ghost_norm needs a model whose only batch-coupling layers are BatchNorm1d/2d/3d "
                         "(see ghost_ready); call the model once per ghost batch instead")
    layers = [m for m in model.modules() if type(m) in _BN]
    try:
        for bn in layers:
            bn.forward = _grouped_forward(bn, size)
        yield
    finally:
        for bn in layers:
            bn.__dict__.pop("forward", None)


def _grouped_forward(bn: nn.modules.batchnorm._BatchNorm, size: int):
    plain = type(bn).forward.__get__(bn)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not bn.training or len(x) == size:
            return plain(x)
        if len(x) % size:
            raise ValueError(f"a batch of {len(x)} samples does not split into ghost batches of {size}")
        groups = len(x) // size
        xg = x.reshape(groups, size, *x.shape[1:])
        dims = (1, *range(3, xg.ndim))
        mean = xg.mean(dims, keepdim=True)
        var = xg.var(dims, unbiased=False, keepdim=True)
        shape = (1, 1, -1, *([1] * (xg.ndim - 3)))
        out = (xg - mean) * torch.rsqrt(var + bn.eps)
        if bn.affine:
            out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        if bn.track_running_stats and bn.running_mean is not None:
            count = xg[0].numel() // xg.shape[2]  # values per channel in one group
            unbiased = var.detach().reshape(groups, -1) * count / (count - 1)
            _update_running(bn, mean.detach().reshape(groups, -1), unbiased)
        return out.reshape(x.shape)

    return forward


@torch.no_grad()
def _update_running(bn: nn.modules.batchnorm._BatchNorm, means: torch.Tensor, variances: torch.Tensor) -> None:
    """The running buffers after one update per group (rows of ``means``/``variances``), in order.

    A fixed momentum m unrolls to r = (1 - m)^k r + sum_j m (1 - m)^(k - 1 - j) s_j (one product);
    ``momentum=None`` (cumulative average) updates group by group."""
    k = len(means)
    if bn.momentum is not None:
        m = float(bn.momentum)
        w = m * (1 - m) ** torch.arange(k - 1, -1, -1, dtype=torch.float64)
        keep = (1 - m) ** k
        for buf, stats in ((bn.running_mean, means), (bn.running_var, variances)):
            buf.copy_((keep * buf.double() + w @ stats.double()).to(buf.dtype))
        bn.num_batches_tracked.add_(k)
        return
    for mean, var in zip(means, variances, strict=True):
        bn.num_batches_tracked.add_(1)
        f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - f).add_(mean, alpha=f)
        bn.running_var.mul_(1 - f).add_(var, alpha=f)
