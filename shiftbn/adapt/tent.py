"""Tent (Wang et al. 2021): entropy minimization of BN's affine parameters at test time.

Why: batch statistics alone (``batch:B``) correct a shift of the first two moments; Tent also moves
the scale and shift after normalization, from the predictions' entropy, without labels. The online
form is the published one (github.com/DequanWang/tent): every BN layer normalizes with batch
statistics, only ``BatchNorm2d`` weight and bias adapt, and each test batch is predicted by the
forward that computes its update. The offline form adapts on calibration data first, then predicts.
Both run on a copy of the model, so the caller's model is never changed.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from shiftbn._forward import PLAIN, Runner
from shiftbn._lock import model_lock
from shiftbn._torch import (
    Inputs,
    autocast,
    batch_chunks,
    device_of,
    outputs_in_order,
    take_inputs,
)
from shiftbn.bn.batchstats import batch_stats_logits


def check_lr(lr: float) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"tent needs a finite learning rate > 0, got {lr!r}")
    return float(lr)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean softmax entropy over the batch (the official ``softmax_entropy(x).mean(0)``), float32; for dense
    outputs (N, K, *S) the mean over samples and positions (Tent for segmentation)."""
    x = logits.float()
    return -(x.softmax(1) * x.log_softmax(1)).sum(1).mean()


class _Adapter:
    """A copy of the model set up for Tent, Adam on float32 master copies of its adapted parameters.

    ``only_2d``: adapt ``BatchNorm2d`` affine parameters only (the official ``collect_params``); else
    those of every BN layer. Every BN layer normalizes with batch statistics and keeps no running
    statistics (the official ``configure_model``); other modules run in eval mode (the official code
    puts the whole model in train mode: the same outputs unless it has dropout or similar).
    Masters keep Adam exact for float32 models and free of NaN for half-precision ones.
    """

    def __init__(self, model: nn.Module, lr: float, only_2d: bool, runner: Runner = PLAIN) -> None:
        with model_lock(model):  # never copy buffers another thread has swapped
            self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
                m.track_running_stats = False
                m.running_mean, m.running_var = None, None
        adapted = [m for m in self.model.modules()
                   if isinstance(m, nn.BatchNorm2d if only_2d else _BatchNorm) and m.affine]
        self.params = [p for m in adapted for p in (m.weight, m.bias)]
        if not self.params:
            what = "BatchNorm2d layers with affine parameters (as published)" if only_2d else \
                "BN layers with affine parameters (affine=True)"
            hint = "; tent:B:all (all_bn=True) and tent-offline:S adapt every BN layer" if only_2d else ""
            raise ValueError(f"tent adapts {what}, and this model has none{hint}")
        for p in self.params:
            p.requires_grad_(True)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.Adam(self.masters, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.device = device_of(self.model)
        self.runner = runner
        self._initial = None

    def save(self) -> None:
        """Remember parameters and optimizer state (for episodic resets)."""
        self._initial = ([m.detach().clone() for m in self.masters], copy.deepcopy(self.opt.state_dict()))

    def reset(self) -> None:
        masters, state = self._initial
        with torch.no_grad():
            for p, m, m0 in zip(self.params, self.masters, masters, strict=True):
                m.copy_(m0)
                p.copy_(m0)
        self.opt.load_state_dict(copy.deepcopy(state))

    @torch.enable_grad()
    def step(self, x: torch.Tensor, amp: bool) -> torch.Tensor:
        """Forward ``x``, one Adam step on its mean entropy; returns that forward's outputs (detached)."""
        with autocast(self.device, amp):
            try:
                out = self.runner.outputs(self.model, x, self.device)
            except ValueError as e:  # BN in training refuses one value per channel (one sample, no positions)
                if "more than 1 value per channel" not in str(e):
                    raise
                raise ValueError("a tent batch gives a BN layer one value per channel, which batch statistics "
                                 "cannot normalize; use at least 2 samples per batch (batch 1 works for dense "
                                 "inputs such as images, whose positions give each channel many values)") from e
        loss = _entropy(out)
        for p in self.params:
            p.grad = None
        loss.backward()
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)
        return out.detach()


def tent_online_logits(model: nn.Module, data: Inputs, batch_size: int, seed: int, *, steps: int = 1,
                       episodic: bool = False, lr: float = 1e-3, amp: bool = False, all_bn: bool = False,
                       runner: Runner = PLAIN, chunks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Published (online) Tent: outputs (N, K) float32 of the test stream, adapted batch by batch.

    The samples of ``data`` are shuffled with ``seed`` into near-equal batches of at most
    ``batch_size`` (the stream); for each batch ``steps`` times: forward, Adam step on its entropy
    (lr, betas (0.9, 0.999), no weight decay: the official CIFAR config); the batch's outputs are
    those of the last forward, taken before its update (official ``forward_and_adapt``). Adaptation
    carries over to the next batch unless ``episodic`` (parameters and optimizer reset per batch).
    Runs on a copy: ``model`` is never changed.

    Why: the functional form of the strategy ``tent`` (``tent-episodic``), for use outside the matrix.

    Args:
        model: a model with ``BatchNorm2d`` layers with affine parameters (the ones adapted).
        data: the test stream's inputs: a tensor (N, ...) or a dataset read batch by batch.
        batch_size: at most this many samples per test batch.
        seed: seeds the shuffle of the samples into the stream's batches.
        steps: Adam steps per batch (>= 1).
        episodic: reset parameters and optimizer before each batch.
        lr: Adam's learning rate (> 0).
        amp: run forwards under autocast.
        all_bn: adapt the affine parameters of every BN layer (``BatchNorm1d``/``3d`` too, e.g. a 3-D
            U-Net); the published form, and the default, adapts ``BatchNorm2d`` only.
        runner: the user's forward and the per-batch reduction (``shiftbn._forward.Runner``); the
            entropy is that of the forward's outputs (mean over positions for dense outputs).
        chunks: the stream itself, its batches in order as tensors of positions of ``data`` (each
            position once); default the seeded shuffle ``batch_chunks(N, batch_size, seed)``. A study
            streaming several sources one after another passes its own order here.

    Returns:
        A float32 tensor (N, K), rows in the order of ``data``.

    Raises:
        ValueError: no samples, a batch that gives a BN layer one value per channel (batch 1 of
            feature vectors), ``chunks`` not covering each position once, ``steps`` or ``lr`` out of
            range, or no affine ``BatchNorm2d`` layer (any BN layer with ``all_bn``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                       nn.Flatten(), nn.Linear(4, 3))
        >>> tent_online_logits(model, torch.randn(20, 1, 6, 6), batch_size=8, seed=0).shape
        torch.Size([20, 3])
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"online tent needs steps >= 1 per batch (an integer), got {steps!r}")
    n = len(data)
    if n < 1:
        raise ValueError("no inputs to evaluate: the data is empty")
    if chunks is None:
        chunks = batch_chunks(n, batch_size, seed)
    elif sorted(int(i) for c in chunks for i in c) != list(range(n)):
        raise ValueError(f"chunks must hold every position 0..{n - 1} of data exactly once")
    ad = _Adapter(model, check_lr(lr), only_2d=not all_bn, runner=runner)
    if episodic:
        ad.save()

    def adapt_and_predict(x):
        if episodic:
            ad.reset()
        for _ in range(steps):
            part = ad.step(x, amp)
        return part

    return outputs_in_order(data, chunks, adapt_and_predict, runner)


def tent_offline_logits(model: nn.Module, calibration: Inputs, data: Inputs, steps: int, batch_size: int,
                        seed: int, *, lr: float = 1e-3, amp: bool = False, runner: Runner = PLAIN) -> torch.Tensor:
    """Offline Tent: ``steps`` Adam steps on random calibration batches, then prediction-time BN on ``data``.

    Why: the functional form of the strategy ``tent-offline:S``: every BN layer's affine parameters
    adapt on unlabeled calibration data (seeded random batches of ``batch_size``), then ``data`` is
    predicted with batch statistics in seeded batches of ``batch_size``. Runs on a copy: ``model`` is
    never changed.

    Args:
        model: a model with BN layers with affine parameters.
        calibration: the target's unlabeled calibration inputs: a tensor (M, ...) or a dataset.
        data: the test inputs: a tensor (N, ...) or a dataset read batch by batch.
        steps: Adam steps (0: prediction-time BN alone).
        batch_size: calibration and test batch size.
        seed: seeds the calibration batches and the test batches.
        lr: Adam's learning rate (> 0).
        amp: run forwards under autocast.
        runner: the user's forward and the per-batch reduction (``shiftbn._forward.Runner``).

    Returns:
        A float32 tensor (N, K), rows in the order of ``data``.

    Raises:
        ValueError: ``lr`` out of range, or no BN layer with affine parameters.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> out = tent_offline_logits(model, torch.randn(30, 4), torch.randn(10, 4), steps=3, batch_size=8, seed=0)
        >>> out.shape
        torch.Size([10, 3])
    """
    ad = _Adapter(model, check_lr(lr), only_2d=False, runner=runner)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(calibration), generator=gen)[: min(batch_size, len(calibration))]
        ad.step(take_inputs(calibration, idx), amp)
    return batch_stats_logits(ad.model, data, batch_size, seed, amp=amp, runner=runner)
