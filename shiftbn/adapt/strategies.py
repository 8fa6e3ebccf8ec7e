"""Test-time strategies: which BN statistics (or adaptation) a source is evaluated with.

A strategy object carries three separate things: its display ``name`` (the ``strategy`` column),
``stats_source(ctx, j)`` (the ``stats_source`` column: which statistics it uses on eval source
``j``) and ``cache_key(ctx, j)`` (strategies with equal keys on ``j`` give equal outputs, which the
matrix computes once; ``None`` = never shared). It declares what it reads from the context
(``stats_sources``, ``calibration_sources``, ``needs_precise``) so the matrix never tests for a
concrete class, and ``cross_source`` marks cells of the cross-source matrix (statistics of source
i evaluated on j). ``logits(ctx, j, x)`` returns (N, K) outputs and never leaves ``ctx.model``
changed (through ``use_stats``, a flag-restoring forward or a copy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Sequence

import torch

from shiftbn._lock import model_lock
from shiftbn._torch import Inputs, autocast, batch_stats_logits, concat_inputs, device_of, forward_batches, take_inputs
from shiftbn.adapt.context import AdaptContext
from shiftbn.bn import BNStats, bn_layers, buffer_stats, mix_stats, preserved, use_stats


class Strategy:
    """Base: evaluate with fixed BN statistics ``bn_stats(ctx, j)`` (``None`` = the model's own).

    Subclasses set ``name`` and override ``stats_source`` and ``bn_stats`` (or ``logits``).
    """

    name: str = "strategy"
    cross_source: bool = False
    needs_precise: bool = False

    def stats_source(self, ctx: AdaptContext, eval_source: str) -> str:
        """Label of the statistics used on ``eval_source`` (the table's ``stats_source`` column)."""
        raise NotImplementedError

    def cache_key(self, ctx: AdaptContext, eval_source: str) -> Hashable | None:
        """Strategies with equal keys on a source give equal outputs there; ``None``: never shared.

        Default: the statistics of the named source (``target`` on j, ``stats:j`` and ``per-source``
        share); the model's own statistics and PreciseBN have keys of their own, so a source called
        ``ema`` or ``precise`` never shares their outputs.
        """
        return ("source-stats", self.stats_source(ctx, eval_source), eval_source)

    def stats_sources(self, eval_source: str) -> set[str]:
        """Sources whose calibration statistics this strategy reads when evaluating ``eval_source``."""
        return set()

    def calibration_sources(self, eval_source: str) -> set[str]:
        """Sources whose calibration inputs this strategy reads when evaluating ``eval_source``."""
        return set()

    def expand(self, sources: Sequence[str]) -> list[Strategy]:
        """The strategies this one stands for, given the dataset's sources (itself, by default)."""
        return [self]

    def bn_stats(self, ctx: AdaptContext, eval_source: str) -> BNStats | None:
        raise NotImplementedError

    def logits(self, ctx: AdaptContext, eval_source: str, x: Inputs) -> torch.Tensor:
        """Outputs (N, K) float32 for the inputs ``x`` of ``eval_source`` (a tensor (N, ...) or a dataset
        read batch by batch)."""
        stats = self.bn_stats(ctx, eval_source)
        if stats is None:
            with preserved(ctx.model):
                ctx.model.eval()
                return forward_batches(ctx.model, x, ctx.batch_size, amp=ctx.amp, progress=ctx.progress,
                                       desc=f"{self.name} on {eval_source}")
        with use_stats(ctx.model, stats):
            return forward_batches(ctx.model, x, ctx.batch_size, amp=ctx.amp, progress=ctx.progress,
                                       desc=f"{self.name} on {eval_source}")

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


class Source(Strategy):
    """``source``: the running statistics stored in the model (the EMA from training)."""

    name = "source"

    def stats_source(self, ctx, eval_source):
        return "ema"

    def cache_key(self, ctx, eval_source):
        return ("ema", eval_source)

    def bn_stats(self, ctx, eval_source):
        return None


class Precise(Strategy):
    """``precise``: PreciseBN over the training sources' calibration data, in random batches that mix
    the sources as training batches usually do (exact pooled moments; one more statistics pass)."""

    name = "precise"
    needs_precise = True

    def stats_source(self, ctx, eval_source):
        return "precise"

    def cache_key(self, ctx, eval_source):
        return ("precise", eval_source)

    def bn_stats(self, ctx, eval_source):
        return ctx.precise_stats()


class Target(Strategy):
    """``target`` (AdaBN): statistics of the evaluated source's own unlabeled calibration data."""

    name = "target"

    def stats_source(self, ctx, eval_source):
        return eval_source

    def stats_sources(self, eval_source):
        return {eval_source}

    def bn_stats(self, ctx, eval_source):
        return ctx.source_stats(eval_source)


class PerSource(Target):
    """``per-source`` (DSBN-style): each sample normalized with its own source's statistics.

    Evaluating one source at a time this equals ``target``; it needs the source tag at test time.
    """

    name = "per-source"


class StatsFrom(Strategy):
    """``stats:<name>``: statistics of another named source (recalibrate on i, evaluate on j)."""

    cross_source = True

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source:
            raise ValueError(f"StatsFrom needs a source name, got {source!r}")
        self.source = source
        self.name = f"stats:{source}"

    def stats_source(self, ctx, eval_source):
        return self.source

    def stats_sources(self, eval_source):
        return {self.source}

    def bn_stats(self, ctx, eval_source):
        return ctx.source_stats(self.source)


class StatsFromEach(Strategy):
    """``stats:*``: one ``StatsFrom`` per source of the dataset (the full cross-source matrix)."""

    name = "stats:*"
    cross_source = True

    def expand(self, sources):
        return [StatsFrom(s) for s in sources]


class Prior(Strategy):
    """``prior:N`` (Schneider et al. 2020): source (EMA) and target statistics mixed per layer with
    weight N/(N+n) on the source, n the number of target calibration samples; ``prior:0`` = AdaBN."""

    def __init__(self, n: float) -> None:
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            raise ValueError(f"prior:N needs a finite N >= 0, got {n!r}")
        self.n = float(n)
        self.name = f"prior:{n:g}"

    def stats_source(self, ctx, eval_source):
        return self.name

    def cache_key(self, ctx, eval_source):
        return ("prior", self.n, eval_source)

    def stats_sources(self, eval_source):
        return {eval_source}

    def bn_stats(self, ctx, eval_source):
        target = ctx.source_stats(eval_source)
        n = target.num_samples
        try:
            source = buffer_stats(ctx.model)
        except ValueError as e:
            raise ValueError(f"strategy {self.name!r} mixes the model's running statistics with the target's, "
                             f"but {e}") from None
        return mix_stats(source, target, self.n / (self.n + n) if self.n + n > 0 else 0.0)


class BatchStats(Strategy):
    """``batch:B``: prediction-time BN, the target evaluated in batches of B with their own statistics.

    ``batch:B:mixed`` draws each batch from all evaluated sources together, to show why batch
    composition matters at test time. Under ``torch.distributed`` the matrix deals the seeded batches
    to the ranks, each batch whole on one rank (``batch:B:mixed``: all on one rank), so the outputs
    equal one process's.
    """

    def __init__(self, batch: int, mixed: bool = False) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
            raise ValueError(f"batch:B needs an integer B >= 2 (BN cannot normalize one sample), got {batch!r}")
        self.batch, self.mixed = batch, mixed
        self.name = f"batch:{batch}" + (":mixed" if mixed else "")

    def stats_source(self, ctx, eval_source):
        return "mixed-batch" if self.mixed else "batch"

    def cache_key(self, ctx, eval_source):
        return None

    def logits(self, ctx, eval_source, x):
        if not self.mixed:
            return batch_stats_logits(ctx.model, x, self.batch, ctx.seed, amp=ctx.amp, progress=ctx.progress,
                                      desc=f"{self.name} on {eval_source}")
        return ctx.memo(("shiftbn", "mixed-batch", self.batch), lambda: self._mixed(ctx))[eval_source]

    def _mixed(self, ctx: AdaptContext) -> dict[str, torch.Tensor]:
        names = list(ctx.eval_sources)
        xs = [ctx.eval_inputs(s) for s in names]
        out = batch_stats_logits(ctx.model, concat_inputs(xs), self.batch, ctx.seed, amp=ctx.amp)
        return dict(zip(names, torch.split(out, [len(v) for v in xs]), strict=True))


class Tent(Strategy):
    """``tent:S`` (Wang et al. 2021): S steps of entropy minimization of BN's affine parameters on the
    target's unlabeled calibration data (Adam, lr 1e-3, batch statistics), on a copy of the model;
    then prediction with batch statistics in batches of ``batch`` (default 64). Adam and its
    state run on float32 copies of the parameters, so half-precision models adapt without NaN.
    Under ``torch.distributed`` the matrix adapts and predicts each source on one rank (the source's
    position among the eval sources, modulo the world size), sources spread over ranks; outputs
    are gathered, and equal one process's."""

    def __init__(self, steps: int, lr: float = 1e-3, batch: int = 64) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"tent:S needs an integer S >= 0, got {steps!r}")
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"tent needs a finite learning rate > 0, got {lr!r}")
        self.steps, self.lr, self.batch = steps, lr, batch
        self.name = f"tent:{steps}"

    def stats_source(self, ctx, eval_source):
        return eval_source

    def cache_key(self, ctx, eval_source):
        return None

    def calibration_sources(self, eval_source):
        return {eval_source}

    def logits(self, ctx, eval_source, x):
        with model_lock(ctx.model):  # never copy buffers another thread has swapped
            model = copy.deepcopy(ctx.model)
        layers = bn_layers(model)
        params = [p for layer in layers for p in layer.module.parameters(recurse=False)]
        if not params:
            raise ValueError("tent needs BN layers with affine parameters (affine=True)")
        model.eval()
        model.requires_grad_(False)
        for layer in layers:
            layer.module.train()
            layer.module.requires_grad_(True)
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        opt = torch.optim.Adam(masters, lr=self.lr)
        cal = ctx.calibration_inputs(eval_source)
        gen = torch.Generator().manual_seed(ctx.seed)
        device = device_of(model)
        for _ in range(self.steps):
            idx = torch.randperm(len(cal), generator=gen)[: min(self.batch, len(cal))]
            with autocast(device, ctx.amp):
                out = model(take_inputs(cal, idx).to(device))
            logp = torch.log_softmax(out.float(), dim=1)
            loss = -(logp.exp() * logp).sum(1).mean()
            for p in params:
                p.grad = None
            loss.backward()
            for p, m in zip(params, masters, strict=True):
                m.grad = None if p.grad is None else p.grad.float()
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masters, strict=True):
                    p.copy_(m)
        return batch_stats_logits(model, x, self.batch, ctx.seed, amp=ctx.amp, progress=ctx.progress,
                                  desc=f"{self.name} on {eval_source}")
