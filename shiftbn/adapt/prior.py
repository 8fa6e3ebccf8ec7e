"""Prior-weighted BN (Schneider et al. 2020): source statistics as a prior on target statistics.

Why: a handful of target samples gives noisy statistics; mixing them with the source's, weight
N/(N+n) on the source, interpolates between the source model (n << N) and AdaBN (n >> N). As in
the published method (robusta's ``BayesianBatchNorm``), each BN layer measures its target statistics
on the input it receives *at inference*: every layer above it already normalizes with its own mixed
statistics. Means and variances are mixed linearly (the paper's equation; robusta does the same);
the target variance is the exact population variance (robusta takes PyTorch's running-variance
update, unbiased by count/(count-1), count = samples x spatial positions per channel).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from shiftbn._forward import PLAIN, Forward, Runner
from shiftbn._lock import model_lock
from shiftbn._torch import Inputs, autocast, batch_chunks, device_of, iter_inputs, outputs_in_order
from shiftbn.bn import BNLayer, PopulationStats, bn_layers, buffer_stats
from shiftbn.bn.batchstats import normalizing_with
from shiftbn.bn.hooks import OnInput, observe_bn_inputs
from shiftbn.bn.moments import Workspace, batch_moments, fast_batch_moments
from shiftbn.bn.population import Population
from shiftbn.bn.reduce import RunningMoments
from shiftbn.bn.state import ModelSnapshot


def prior_weight(prior: float, n: int) -> float:
    """The source's weight N/(N+n) (0 when N = n = 0)."""
    return prior / (prior + n) if prior + n > 0 else 0.0


def check_prior(prior: float) -> float:
    """``prior`` as a float, refused unless finite and >= 0."""
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not math.isfinite(prior) or prior < 0:
        raise ValueError(f"prior:N needs a finite prior strength N >= 0, got {prior!r}")
    return float(prior)


def source_stats_of(model: nn.Module, what: str) -> PopulationStats:
    """The model's running statistics (the prior), with an error naming ``what`` needs them."""
    try:
        return buffer_stats(model)
    except ValueError as e:
        raise ValueError(f"{what} mixes the model's running statistics with the target's, but {e}") from None


class _Source(NamedTuple):
    """A layer's source statistics as float64 tensors on the device of its inputs (read by ``_mix``)."""

    mean: torch.Tensor
    var: torch.Tensor


def _mix(src: Population | _Source, mean: torch.Tensor, var: torch.Tensor,
         w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w * source + (1 - w) * target, for means and variances, float64 on the target's device."""
    sm = torch.as_tensor(src.mean, dtype=torch.float64, device=mean.device)
    sv = torch.as_tensor(src.var, dtype=torch.float64, device=mean.device)
    return w * sm + (1 - w) * mean, w * sv + (1 - w) * var


def _mixer(source: PopulationStats, prior: float, measure: dict[str, Population] | None) -> OnInput:
    """The hook of prior-weighted BN: each BN call normalizes with N/(N+n) source + n/(N+n) statistics of its
    own input (n = samples), written into the buffers the eval-mode module then normalizes with (see
    ``normalizing_with``), so the layers below see activations normalized as at inference. ``measure``:
    filled with each module's mixed statistics."""
    # per forward of the matrix's per-batch prior:N, every BN call needs a scratch copy of its input and the
    # source statistics as tensors: one reused buffer and one conversion per layer instead of a fresh
    # allocation (page faults) and a numpy -> tensor conversion per call
    space = Workspace()
    held: dict[tuple[str, torch.device], _Source] = {}

    def source_of(name: str, device: torch.device) -> _Source:
        if (name, device) not in held:
            src = source[name]
            held[name, device] = _Source(torch.as_tensor(src.mean, dtype=torch.float64, device=device),
                                         torch.as_tensor(src.var, dtype=torch.float64, device=device))
        return held[name, device]

    # the per-batch form reads each batch's moments in three float32 passes (fast_batch_moments, within ~1e-7 of
    # the float64 copy); the few-shot form (measure) returns its statistics to the user: exact float64 moments
    moments = batch_moments if measure is not None else fast_batch_moments

    def mix(layer: BNLayer, k: int, x: torch.Tensor) -> None:
        count, mean, m2 = moments(x, space)
        mixed_mean, mixed_var = _mix(source_of(layer.name, mean.device), mean, m2 / count,
                                     prior_weight(prior, x.shape[0]))
        layer.module.running_mean.copy_(mixed_mean)
        layer.module.running_var.copy_(mixed_var)
        if measure is not None:
            if k > 0:
                raise ValueError(f"BN module {layer.name!r} is called more than once per forward; few-shot prior "
                                 "statistics need every BN module called once (use the per-batch form prior:N)")
            measure[layer.name] = Population(mixed_mean.cpu().numpy(), mixed_var.cpu().numpy())

    return mix


@torch.no_grad()
def prior_batch_logits(model: nn.Module, data: Inputs, prior: float, batch_size: int, seed: int, *,
                       amp: bool = False, runner: Runner = PLAIN) -> torch.Tensor:
    """Outputs (N, K) float32 with prior-weighted BN per test batch (the paper's prediction-time form).

    Samples are shuffled with ``seed`` into near-equal batches of at most ``batch_size``; in each batch
    of n samples every BN layer normalizes with N/(N+n) source + n/(N+n) statistics of its input in that
    forward. ``prior`` = 0 is prediction-time BN (``batch:B``); a huge ``prior`` is the source model.
    The model is left as it was (flags and buffers restored).

    Why: the functional form of the strategy ``prior:N:B``, for use outside the matrix.

    Args:
        model: a model whose BN layers hold running statistics (the prior).
        data: the test inputs: a tensor (N, ...) or a dataset read batch by batch.
        prior: the prior strength N >= 0 (in samples).
        batch_size: at most this many samples per test batch.
        seed: seeds the shuffle of the samples into batches.
        amp: run forwards under autocast.
        runner: the user's forward and the per-batch reduction (``shiftbn._forward.Runner``).

    Returns:
        A float32 tensor (N, K), rows in the order of ``data``.

    Raises:
        ValueError: ``prior`` is negative or not finite, ``data`` is empty, or a BN layer has no
            running statistics.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> prior_batch_logits(model, torch.randn(10, 4), prior=16, batch_size=4, seed=0).shape
        torch.Size([10, 3])
    """
    prior = check_prior(prior)
    n = len(data)
    if n < 1:
        raise ValueError("no inputs to evaluate: the data is empty")
    source = source_stats_of(model, f"prior:{prior:g}")
    layers = bn_layers(model)
    device = device_of(model)
    with normalizing_with(model, layers, _mixer(source, prior, None)), autocast(device, amp):
        return outputs_in_order(data, batch_chunks(n, batch_size, seed), lambda x: runner.outputs(model, x, device),
                                runner)


@torch.no_grad()
def prior_stats(model: nn.Module, data: Inputs, prior: float, *, batch_size: int = 256,
                amp: bool = False, forward: Forward | None = None) -> PopulationStats:
    """Prior-weighted statistics of every BN layer from the n samples of ``data`` (few-shot adaptation).

    Per layer: N/(N+n) source (the model's running statistics) + n/(N+n) exact mean and variance of the
    layer's input over all n samples, with every layer above it normalizing with its own mixed
    statistics (inference-consistent, as robusta's ``BayesianBatchNorm`` on one batch of n). When n
    fits one batch that is one forward; else one truncated pass per layer in call order (same result,
    memory O(batch)). ``prior`` = 0 gives the inference-consistent target statistics
    (``collect_stats(mode="sequential")``). The model is left as it was.

    Why: the functional form of the few-shot strategy ``prior:N@n``: adapt once from n target
    samples, then predict every test sample with the same statistics.

    Args:
        model: a model whose BN layers hold running statistics (the prior).
        data: the n target samples: a tensor (n, ...) or a dataset read batch by batch.
        prior: the prior strength N >= 0 (in samples).
        batch_size: samples per forward (more than one batch: one truncated pass per BN layer).
        amp: run forwards under autocast.
        forward: ``forward(model, x) -> outputs`` run on each batch instead of ``model(x)``.

    Returns:
        ``PopulationStats`` (``num_samples`` = n), one entry per BN layer, to load with ``use_stats``.

    Raises:
        ValueError: ``prior`` is negative or not finite, ``data`` is empty, a BN layer has no running
            statistics, or (several batches) a BN module is called more than once per forward.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> stats = prior_stats(model, torch.randn(10, 4), prior=16)
        >>> stats.num_samples, list(stats), stats["1"].mean.shape
        (10, ['1'], (8,))
        >>> with sb.use_stats(model, stats):
        ...     model(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """
    prior = check_prior(prior)
    n = len(data)
    if n < 1:
        raise ValueError("prior statistics need at least one sample")
    source = source_stats_of(model, f"prior:{prior:g}")
    layers = bn_layers(model)
    device = device_of(model)
    runner = Runner(forward=forward)
    if n <= batch_size:
        measured: dict[str, Population] = {}
        with normalizing_with(model, layers, _mixer(source, prior, measured)), autocast(device, amp):
            runner.outputs(model, next(iter_inputs(data, [range(n)])), device)
        return PopulationStats({layer.name: measured[layer.name] for layer in layers if layer.name in measured}, n)
    return _layer_by_layer(model, layers, data, source, prior, batch_size, amp, runner)


def _layer_by_layer(model, layers, data, source, prior, batch_size, amp, runner) -> PopulationStats:
    """Layer j's moments over all batches, with layers before it loaded with their final mixed statistics."""
    n = len(data)
    chunks = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    device = device_of(model)
    by_name = {layer.name: layer for layer in layers}
    order = _call_order(model, layers, data, device, amp, runner)
    w = prior_weight(prior, n)
    done: dict[str, Population] = {}
    with model_lock(model):
        snap = ModelSnapshot(model, layers)
        try:
            model.eval()
            for name in order:
                acc = RunningMoments()
                # the rest of each forward is not needed once the measured layer has seen its input; a user's
                # forward may call the model several times per batch (micro-batches), so it is never cut short
                stop = name if runner.forward is None else None
                with observe_bn_inputs(model, [by_name[name]], lambda layer, k, x, acc=acc: acc.add(x),
                                       stop_after=stop) as hooks:
                    for x in iter_inputs(data, chunks):
                        with autocast(device, amp):
                            hooks.call(lambda x=x: runner.outputs(model, x, device))
                if acc.mean is None:
                    raise ValueError(f"BN layer {name!r} saw no input in the layer-by-layer pass")
                mean, var = _mix(source[name], acc.mean, acc.m2 / acc.count, w)
                done[name] = Population(mean.cpu().numpy(), var.cpu().numpy())
                module = by_name[name].module
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
        finally:
            snap.restore()
    return PopulationStats({layer.name: done[layer.name] for layer in layers if layer.name in done}, n)


def _call_order(model, layers, data, device, amp, runner) -> list[str]:
    """BN modules in first-call order on one sample batch; refused when a module is called twice."""
    with model_lock(model), observe_bn_inputs(model, layers, lambda layer, k, x: None) as hooks:
        snap = ModelSnapshot(model, layers)
        try:
            model.eval()
            with autocast(device, amp):
                runner.outputs(model, next(iter_inputs(data, [range(min(2, len(data)))])), device)
        finally:
            snap.restore()
    twice = [k for k, c in hooks.calls.items() if c > 1]
    if twice:
        raise ValueError(f"BN module(s) {twice} are called more than once per forward; few-shot prior statistics "
                         "over several batches need every BN module called once: raise batch_size to n or use "
                         "the per-batch form prior:N")
    return hooks.order


def take_samples(data: Inputs, n: int, seed: int) -> Inputs:
    """``n`` samples of ``data`` drawn without replacement (seeded), as a tensor or a dataset view."""
    if n > len(data):
        raise ValueError(f"prior:N@n asks for n={n} target samples but only {len(data)} calibration samples exist; "
                         "use a smaller n or a larger calibration fraction")
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(idx)]
    return Subset(data, idx.tolist())
