"""What a strategy may see while it is evaluated: the model, calibration data and statistics."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

from shiftbn._torch import Inputs
from shiftbn.bn import BNStats, SourceStats

T = TypeVar("T")


@dataclass(kw_only=True)
class AdaptContext:
    """The model and the unlabeled data strategies may use; built by keyword.

    Args:
        model: the model under evaluation (strategies never leave it changed).
        source_stats_fn: computes per-source statistics of every source's calibration samples; called
            at most once, on the first ``source_stats`` call (no pass when no strategy needs it).
        calibration_inputs: ``f(source) -> Inputs``: a source's unlabeled calibration inputs (a tensor
            (N, ...) or a dataset that strategies read batch by batch).
        eval_inputs: ``f(source) -> Inputs``: a source's evaluation inputs.
        train_sources: the sources the model was trained on.
        eval_sources: the sources being evaluated.
        precise_stats_fn: PreciseBN statistics of the training sources' calibration data, or None.
        batch_size: evaluation batch size; ``seed``: seed of every random choice a strategy makes.
        amp: run forwards under autocast (mixed precision); outputs are float32 either way.
        progress: strategies show a bar per evaluation pass (samples/s, ETA) on a terminal.

    ``memo(key, compute)`` caches any value for the lifetime of the context (one matrix call), so
    user strategies registered with ``register_strategy`` can share work as built-in ones do.
    """

    model: nn.Module
    source_stats_fn: Callable[[], SourceStats]
    calibration_inputs: Callable[[str], Inputs]
    eval_inputs: Callable[[str], Inputs]
    train_sources: Sequence[str]
    eval_sources: Sequence[str]
    precise_stats_fn: Callable[[], BNStats] | None = None
    batch_size: int = 256
    seed: int = 0
    amp: bool = False
    progress: bool = False
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` for this context; later calls return the cached value."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def stats(self) -> SourceStats:
        """Per-source statistics of the calibration samples (computed on first use)."""
        return self.memo(("shiftbn", "source-stats"), self.source_stats_fn)

    def source_stats(self, name: str) -> BNStats:
        """Calibration statistics of source ``name``."""
        if name not in self.stats:
            raise ValueError(f"no calibration statistics for source {name!r}; it has no calibration samples")
        return self.stats[name]

    def precise_stats(self) -> BNStats:
        """PreciseBN statistics of the training sources (computed on first use)."""
        if self.precise_stats_fn is None:
            raise ValueError("this context has no PreciseBN statistics (precise_stats_fn)")
        return self.memo(("shiftbn", "precise"), self.precise_stats_fn)
