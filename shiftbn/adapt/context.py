"""What a strategy may see while it is evaluated: the model, calibration data and statistics."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

from shiftbn._forward import PLAIN, Runner
from shiftbn._torch import Inputs
from shiftbn.bn import BNStats, SourceStats

T = TypeVar("T")


@dataclass(kw_only=True)
class AdaptContext:
    """The model and the unlabeled data strategies may use; built by keyword.

    Why: a strategy declares what it reads and gets it from here, computed at most once per matrix
    call, so built-in and user strategies share passes and the matrix never tests for a concrete class.
    ``cross_source_matrix`` builds one (``shiftbn.evaluate.collect``); build one yourself to call a
    strategy's ``logits`` directly.

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
        runner: how a batch runs through the model (the user's ``forward(model, x)``) and what of its
            outputs strategies return (``reduce``: e.g. per-case segmentation scores instead of logits).
        task: ``"classification"``, ``"regression"`` or ``"segmentation"`` (what the outputs are scored as).

    Returns:
        An ``AdaptContext`` holding these fields, and ``stats`` (per-source ``SourceStats``, computed on
        first use). ``memo(key, compute)`` caches any value for the lifetime of the context (one matrix
        call), so user strategies registered with ``register_strategy`` can share work as built-in ones do.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(20, 4)
        >>> ctx = AdaptContext(model=model, source_stats_fn=lambda: sb.collect_stats(model, [x], progress=False),
        ...                    calibration_inputs=lambda s: x, eval_inputs=lambda s: x,
        ...                    train_sources=["pooled"], eval_sources=["pooled"])
        >>> ctx.source_stats("pooled").num_samples, Target().logits(ctx, "pooled", x).shape
        (20, torch.Size([20, 3]))
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
    runner: Runner = PLAIN
    task: str = "classification"
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` for this context; later calls return the cached value.

        Why: several strategies (or cells) may need the same pass over the data; the context lives for
        one matrix call, so the cache never outlives the model state it was computed from.

        Args:
            key: any hashable; prefix it with your package's name to avoid clashing with shiftbn's keys.
            compute: called with no argument on the first call for ``key``.

        Returns:
            The value ``compute()`` returned for ``key`` (the same object on every later call).

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> ctx.memo(("mine", "answer"), lambda: 42), ctx.memo(("mine", "answer"), lambda: 0)
            (42, 42)
        """
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def stats(self) -> SourceStats:
        """Per-source statistics of the calibration samples (computed on first use)."""
        return self.memo(("shiftbn", "source-stats"), self.source_stats_fn)

    def source_stats(self, name: str) -> BNStats:
        """Calibration statistics of source ``name``.

        Why: ``target``, ``stats:<name>`` and ``per-source`` normalize with these; the pass that computes
        every source's statistics runs once, on the first call.

        Args:
            name: a source with calibration samples.

        Returns:
            ``BNStats`` of that source's calibration samples, one entry per BN layer.

        Raises:
            ValueError: ``name`` has no calibration samples.

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> ctx.source_stats("lab_0")["1"].mean.shape
            (8,)
        """
        if name not in self.stats:
            raise ValueError(f"no calibration statistics for source {name!r}; it has no calibration samples")
        return self.stats[name]

    def precise_stats(self) -> BNStats:
        """PreciseBN statistics of the training sources (computed on first use).

        Why: ``precise`` (and any strategy with ``needs_precise = True``) normalizes with these; the
        extra statistics pass runs only when some strategy asks.

        Args:
            None.

        Returns:
            ``BNStats`` of the training sources' calibration data in mixed random batches.

        Raises:
            ValueError: the context was built without ``precise_stats_fn``.

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["precise"]), progress=False)
            >>> list(ctx.precise_stats())
            ['1']
        """
        if self.precise_stats_fn is None:
            raise ValueError("this context has no PreciseBN statistics (precise_stats_fn)")
        return self.memo(("shiftbn", "precise"), self.precise_stats_fn)
