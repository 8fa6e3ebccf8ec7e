"""Prediction-time BN: outputs with every BN call normalized by the statistics of its own batch.

Why: ``batch:B`` and the leakage and mini-batch studies score a model whose BN layers use each test
batch's own statistics. PyTorch's training-mode kernel does that natively, but on the CPU it costs
2.5-4x the eval-mode kernel (``benchmarks/bench_groupings.py``). Here each BN call's moments are read
in three float32 passes (``fast_batch_moments``), written into the layer's running buffers and
normalized by the eval-mode kernel: the same outputs up to float32 rounding of the statistics (within
1e-5 on ordinary activations; inputs with a large offset against their spread, e.g. 1e4 +- 1, are
ill-conditioned in float32 for both kernels alike), in less time. The buffers are put back bit for bit
afterwards; a forward that reads a BN layer's running buffers itself sees the batch's moments there.
Layers this cannot serve keep the training-mode kernel: BN classes with their own ``forward`` (they may
change the input the hook sees), layers without running buffers, with lazy, half-precision,
non-contiguous or inference-mode buffers or parameters of another dtype, layers off the CPU (cuDNN's
training kernel is one fused pass), and every layer while gradients are enabled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from shiftbn._forward import PLAIN, Runner
from shiftbn._torch import (
    Inputs,
    autocast,
    batch_chunks,
    device_of,
    explained_errors,
    iter_batches,
    progress_bar,
)
from shiftbn.bn.hooks import OnInput, observe_bn_inputs
from shiftbn.bn.layers import TORCH_BN_FORWARDS, BNLayer, all_bn_layers
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import Workspace, fast_batch_moments
from shiftbn.bn.state import ModelSnapshot

ONE_VALUE = "more than 1 value per channel"
"""Part of the error raised (by PyTorch's kernel and by ``batch_statistics``) for a BN input with one
value per channel, which batch statistics cannot normalize."""


@contextmanager
def normalizing_with(model: nn.Module, layers: Sequence[BNLayer], on_input: OnInput, *,
                     native: Sequence[nn.Module] = ()) -> Iterator[None]:
    """The model in eval mode, ``on_input`` called before every call of ``layers`` (it may write their
    running buffers, which the eval-mode kernel then normalizes with); ``native`` BN modules in training
    mode on batch statistics (``track_running_stats`` off). Flags and buffers restored on exit.

    Why: prediction-time BN and prior-weighted BN differ only in what the hook writes.

    Args:
        model: the model; its lock is held throughout.
        layers: the BN layers whose inputs ``on_input`` sees.
        on_input: ``on_input(layer, call_index, x)``, before each call of those layers.
        native: BN modules that normalize with their batch's statistics by PyTorch's own kernel.

    Returns:
        A context manager.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> with normalizing_with(model, [], lambda *a: None, native=[model[1]]):
        ...     model[1].training
        True
        >>> model.training, model[1].training
        (True, True)
    """
    with model_lock(model):
        snap = ModelSnapshot(model, all_bn_layers(model))
        try:
            model.eval()
            for m in native:
                m.training, m.track_running_stats = True, False
            with observe_bn_inputs(model, layers, on_input):
                yield
        finally:
            snap.restore()


def _measurable(m: _BatchNorm) -> bool:
    """Whether the moments path serves BN module ``m``: torch's own forward (what the pre-hook sees is what
    the kernel normalizes), writable float32/float64 running buffers on the CPU, and affine parameters of
    the buffers' dtype (the eval-mode kernel refuses a mix)."""
    if type(m).forward not in TORCH_BN_FORWARDS or "forward" in vars(m):
        return False
    bufs = (m.running_mean, m.running_var)
    if not all(b is not None and not is_lazy(b) and b.dtype in (torch.float32, torch.float64)
               and b.device.type == "cpu" and b.is_contiguous() and not b.is_inference() for b in bufs):
        return False
    return all(p is None or p.dtype == bufs[0].dtype for p in (m.weight, m.bias))


def _own_moments() -> OnInput:
    space = Workspace()  # one scratch buffer for every call: no fresh allocation (page faults) per layer

    def own(layer: BNLayer, k: int, x: torch.Tensor) -> None:
        bn = layer.module
        bn._check_input_dim(x)  # torch's own message for an input of the wrong rank
        if x.numel() == 0 or x.shape[1] != bn.running_mean.numel():
            return  # nothing to normalize, or the wrong channel count: the kernel says so in its own words
        count, mean, m2 = fast_batch_moments(x, space)
        if count < 2:
            raise ValueError(f"expected {ONE_VALUE} in BN layer {layer.name!r}, got input size {tuple(x.shape)}")
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(m2 / count)

    return own


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every BN call normalizes with the statistics of its own input; no buffer or flag is left changed.

    Why: the one switch to prediction-time BN; see the module's docstring for the two kernels (chosen
    when the block is entered: enter it under ``torch.no_grad()`` for the faster one).

    Args:
        model: any module (BN layers or none).

    Returns:
        A context manager; inside it the model is in eval mode except for its BN layers' batch statistics.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> x = torch.randn(6, 4)
        >>> with torch.no_grad(), batch_statistics(model):
        ...     out = model(x)
        >>> expected = nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, True)
        >>> torch.allclose(out, expected, atol=1e-6), model[1].running_mean.tolist()
        (True, [0.0, 0.0, 0.0])
    """
    layers = all_bn_layers(model)
    # with gradients on, the moments would be constants to autograd: PyTorch's kernel differentiates them
    fast = [] if torch.is_grad_enabled() else [layer for layer in layers if _measurable(layer.module)]
    native = [layer.module for layer in layers if layer not in fast]
    with normalizing_with(model, fast, _own_moments(), native=native):
        yield


@torch.no_grad()
def batch_stats_logits(model: nn.Module, data: Inputs, batch_size: int, seed: int, *,
                       amp: bool = False, progress: bool = False, desc: str = "batch statistics",
                       part: tuple[int, int] | None = None, runner: Runner = PLAIN) -> torch.Tensor:
    """Outputs with every BN layer normalizing each batch by its own statistics (prediction-time BN).

    Samples of ``data`` (N of them) are shuffled with ``seed`` into the batches ``batch_chunks``
    makes (near-equal, at most ``batch_size``; one sample is refused only where a BN layer would get
    one value per channel); outputs (N, K) float32 come back in the original order. The model is left
    as it was (flags and buffers). ``part=(world, rank)``: run only batches ``rank, rank + world, ...``
    (each batch whole) and return their outputs in the order of
    ``torch.cat(batch_chunks(...)[rank::world])`` (possibly none: shape (0,)).

    Why: the one forward of ``batch:B``, Tent's predictions and the studies of batch composition.

    Args:
        model: the model.
        data: the inputs: a tensor (N, ...) or a dataset read batch by batch.
        batch_size: at most this many samples per batch.
        seed: seeds the shuffle of the samples into batches.
        amp: run forwards under autocast.
        progress: a progress bar (on a terminal) titled ``desc``.
        desc: the bar's title.
        part: ``(world, rank)``: this rank's share of the batches.
        runner: the user's forward and the per-batch reduction.

    Returns:
        A float32 tensor (N, K) (or this rank's rows), on the CPU.

    Raises:
        ValueError: ``data`` is empty, or a batch gives a BN layer one value per channel.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> batch_stats_logits(model, torch.randn(10, 4), batch_size=4, seed=0).shape
        torch.Size([10, 3])
    """
    n = len(data)
    if n == 0:
        raise ValueError("no inputs to evaluate: the data is empty")
    chunks = batch_chunks(n, batch_size, seed)
    if part is not None:
        chunks = chunks[part[1]::part[0]]
        if not chunks:
            return torch.empty(0)
    device = device_of(model)
    out: torch.Tensor | None = None
    pos = 0
    with batch_statistics(model), autocast(device, amp), progress_bar(sum(map(len, chunks)), desc, progress) as bar:
        for idx, (x, t) in zip(chunks, iter_batches(data, chunks), strict=True):
            try:
                with explained_errors(model, x):
                    part_out = runner.keep(runner.outputs(model, x, device), t).float()
            except ValueError as e:
                if ONE_VALUE not in str(e):
                    raise
                raise ValueError(f"a batch of {len(idx)} sample(s) gives a BN layer one value per channel, which "
                                 "batch statistics cannot normalize; use at least 2 samples per batch") from e
            if out is None:
                out = torch.empty((n if part is None else sum(map(len, chunks)), *part_out.shape[1:]))
            if part is None:
                out[idx] = part_out
            else:
                out[pos:pos + len(idx)] = part_out
                pos += len(idx)
            bar.update(len(idx))
    return out
