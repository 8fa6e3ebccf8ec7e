"""Streaming exact moments: per-channel sums of (x - K) and (x - K)^2 in float64, K fixed per layer.

Why: a pass over a large dataset must keep O(channels) state per layer and source, not a record
per batch. With a fixed shift K near the data (the first batch's exact mean), float64 sums simply
add across batches and M2 = S2 - S1^2/n stays exact (no cancellation: the offset is removed
before squaring). One read of each BN input per batch; optionally one fused kernel
(``torch.compile``) that reads the float32 input once and accumulates in float64.
"""

from __future__ import annotations

import threading

import torch

from shiftbn.bn.moments import Moments, Workspace

_compiled = None
_compile_lock = threading.Lock()


def _eager_sums(x3: torch.Tensor, shift: torch.Tensor, workspace: Workspace | None) -> tuple[torch.Tensor, ...]:
    """S1, S2 (C,) of x3 (N, C, L) about ``shift`` (C,), float64, on a float64 copy (workspace)."""
    d = workspace.take(x3) if workspace is not None else x3.to(torch.float64, copy=True)
    d.sub_(shift.view(1, -1, 1))
    s1 = d.sum(2).sum(0)
    return s1, d.square_().sum(2).sum(0)


def _fused_sums_impl(x3: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x3.to(torch.float64) - shift.view(1, -1, 1)
    return d.sum((0, 2)), (d * d).sum((0, 2))


def _fused():
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = torch.compile(_fused_sums_impl, dynamic=True)
        return _compiled


def fused_available() -> bool:
    """Whether ``torch.compile`` can build the fused reduction here (a C++ compiler for CPU)."""
    try:
        _fused()(torch.ones(2, 1, 1), torch.zeros(1, dtype=torch.float64))
        return True
    except Exception:  # noqa: BLE001 - any compiler failure means: use the eager reduction
        return False


def shifted_sums(x: torch.Tensor, shift: torch.Tensor, workspace: Workspace | None = None,
                 fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of (x - shift) and (x - shift)^2 over every axis but 1, in float64.

    ``x``: a BN input (N, C, *) of any float dtype and memory layout; ``shift``: (C,) float64 on
    ``x``'s device. Returns two (C,) float64 tensors on that device.
    """
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)
    if fused:
        return _fused()(x3, shift)
    return _eager_sums(x3, shift, workspace)


class RunningMoments:
    """Exact moments of one layer's input for one source, accumulated batch by batch in O(C).

    The shift K is the first batch's exact float64 mean; later batches add their shifted sums.
    ``add`` also returns the batch's own mean and population variance (what train-mode BN
    normalizes with), computed from the same sums.
    """

    __slots__ = ("count", "s1", "s2", "shift")

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor, workspace: Workspace | None = None,
            fused: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Add a batch (N, C, *); returns its count per channel, mean (C,) and variance (C,)."""
        c = x.numel() // x.shape[1]
        if self.shift is None:
            self.shift = x.detach().to(torch.float64).mean(dim=[d for d in range(x.ndim) if d != 1])
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros_like(self.shift)
        s1, s2 = shifted_sums(x, self.shift, workspace, fused)
        self.s1 += s1
        self.s2 += s2
        self.count += c
        d = s1 / c
        return c, self.shift + d, (s2 / c - d * d).clamp_(min=0)

    def finite(self) -> bool:
        """Whether every sum is finite (one check per pass: NaN/Inf in any batch shows here)."""
        return self.s1 is None or bool(torch.isfinite(self.s1.sum() + self.s2.sum()))

    def result(self) -> Moments:
        """Count, mean and M2 per channel (float64 numpy)."""
        if self.shift is None:
            raise ValueError("no batch was added")
        s1, s2 = self.s1.cpu().double(), self.s2.cpu().double()
        mean = self.shift.cpu() + s1 / self.count
        m2 = (s2 - s1 * s1 / self.count).clamp_(min=0)
        return Moments(self.count, mean.numpy(), m2.numpy())
