"""Streaming exact moments of one BN input: O(channels) state, updated batch by batch in float64.

Why: a pass over a large dataset must keep O(channels) state per layer and source, never a record
per batch. Each batch's exact moments are merged into running ones at once (Chan et al.: stable,
exact in float64). A batch's moments come from the exact two-pass float64 reduction, or from one
fused kernel (``torch.compile``) that reads the input once and accumulates shifted sums in float64
about the running mean (the first batch about its first sample's mean): 1e-14 relative at an offset
of 1e4, several times faster on CPU.
"""

from __future__ import annotations

import threading
import warnings

import torch

from shiftbn.bn import native
from shiftbn.bn.moments import Moments, Workspace, batch_moments

_compiled: dict[bool, object] = {}
_failed: set[str] = set()  # device types where the kernel could not be built
_ready: set[str] = set()  # device types where it ran
_compile_lock = threading.Lock()


def _fused_sums_impl(x3: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x3.to(torch.float64) - shift.view(1, -1, 1)
    return d.sum((0, 2)), (d * d).sum((0, 2))


def _fused_rows_impl(x3: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x3.to(torch.float64) - shift.view(1, -1, 1)
    return d.sum(2).sum(0), (d * d).sum(2).sum(0)


ROWS_FROM = 2048
"""Positions per channel (L) from which summing each (sample, channel) row first is faster (CPU: up to
3.6x at 48x48; slower below ~1,000)."""


def fused_ready(device: torch.device) -> bool:
    """Whether the fused kernel already ran on this type of device in this process (no compile to wait for)."""
    return device.type in _ready


def fused_sums(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel sums of (x - shift) and its square over every axis but 1 (float64, one fused read),
    or ``None`` where ``torch.compile`` cannot build the kernel (then a warning says so, once)."""
    kind = x.device.type
    if kind in _failed:
        return None
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)
    rows = x3.shape[2] >= ROWS_FROM
    try:
        with _compile_lock:
            if rows not in _compiled:
                _compiled[rows] = torch.compile(_fused_rows_impl if rows else _fused_sums_impl, dynamic=True)
        sums = _compiled[rows](x3, shift)
        _ready.add(kind)
        return sums
    except Exception as e:  # noqa: BLE001 - a compiler that never worked here: fall back to the eager reduction
        if kind in _ready:
            raise  # the kernel ran before: this error is the data's, not the compiler's
        _failed.add(kind)
        warnings.warn(f"fused BN reduction unavailable on {kind} ({type(e).__name__}: {str(e)[:120]}); using the "
                      "eager float64 reduction (same results, slower)", RuntimeWarning, stacklevel=2)
        return None


def _first_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel float64 mean of the first sample of a batch (N, C, *): a cheap shift near the data."""
    return x[:1].detach().to(torch.float64).reshape(1, x.shape[1], -1).mean((0, 2))


class RunningMoments:
    """Exact count, mean (C,) and M2 (C,) of one layer's input for one source, on the input's device.

    ``add`` merges a batch and returns the batch's own mean and population variance (what
    train-mode BN normalizes with). ``fused``: take a batch's moments from the fused kernel, shifted
    by the running mean (the first batch by its first sample's mean: every batch is one fused read).
    ``add_native``: the C kernel (``bn.native``) adds the batch's sums about a fixed shift K (the first
    such batch's mean) into float64 totals and returns BN's output: no per-batch merge at all.
    """

    __slots__ = ("count", "m2", "mean", "n_native", "s1", "s2", "shift")

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.n_native = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add_native(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """Add a batch (N, C, *) through the C kernel and return ``module``'s batch-mode output.

        Only for inputs ``native.accepts``. The first batch is summed about its first sample's mean,
        then the totals are re-centred on that batch's exact mean (S2 -= S1^2/n, S1 = 0), the shift K
        every later batch is summed about: no extra read, and later totals stay well conditioned."""
        c = x.numel() // x.shape[1]
        first = self.shift is None
        if first:
            self.shift = _first_sample_mean(x)
            self.s1, self.s2 = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        y = native.batch_norm_sums(x, self.shift, self.s1, self.s2, module.weight, module.bias, module.eps)
        self.n_native += c
        if first:
            d = self.s1 / c
            self.shift.add_(d)
            self.s2.sub_(self.s1 * d).clamp_(min=0)
            self.s1.zero_()
        return y

    def add(self, x: torch.Tensor, workspace: Workspace | None = None,
            fused: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Merge a batch (N, C, *); returns its values per channel, mean (C,) and variance (C,)."""
        shift = None
        if fused:
            shift = self.mean if self.mean is not None else _first_sample_mean(x)
        sums = fused_sums(x, shift) if shift is not None else None
        if sums is None:
            c, mean_b, m2_b = batch_moments(x, workspace)
        else:
            c = x.numel() // x.shape[1]
            s1, s2 = sums
            d = s1.div_(c)
            mean_b, m2_b = shift + d, s2.sub_(d * d, alpha=c).clamp_(min=0)  # M2 = S2 - c d^2, d = S1 / c
        if self.mean is None:
            self.count, self.mean, self.m2 = c, mean_b.clone(), m2_b.clone()
        else:
            n = self.count + c
            delta = mean_b - self.mean
            self.mean.add_(delta, alpha=c / n)
            self.m2.add_(m2_b).add_(delta.square_(), alpha=self.count * c / n)
            self.count = n
        return c, mean_b, m2_b.div_(c)

    def finite(self) -> bool:
        """Whether the moments are finite (NaN/Inf in any batch shows here: one check per pass)."""
        ok = self.mean is None or bool(torch.isfinite(self.mean.sum() + self.m2.sum()))
        return ok and (self.s1 is None or bool(torch.isfinite(self.s1.sum() + self.s2.sum())))

    def result(self) -> Moments:
        """Count, mean and M2 per channel as float64 numpy arrays."""
        parts = []
        if self.mean is not None:
            parts.append(Moments(self.count, self.mean.detach().cpu().double().numpy(),
                                 self.m2.detach().cpu().double().numpy()))
        if self.n_native:
            n, d = self.n_native, self.s1 / self.n_native
            m2 = (self.s2 - self.s1 * d).clamp_(min=0)  # M2 = S2 - S1^2 / n about the fixed shift
            parts.append(Moments(n, (self.shift + d).numpy(), m2.numpy()))
        if not parts:
            raise ValueError("no batch was added")
        return parts[0] if len(parts) == 1 else parts[0].merge(parts[1])
