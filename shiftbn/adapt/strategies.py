"""Test-time strategies: which BN statistics (or adaptation) a source is evaluated with.

A strategy object carries three separate things: its display ``name`` (the ``strategy`` column),
``stats_source(ctx, j)`` (the ``stats_source`` column: which statistics it uses on eval source
``j``) and ``cache_key(ctx, j)`` (strategies with equal keys on ``j`` give equal outputs, which the
matrix computes once; ``None`` = never shared). It declares what it reads from the context
(``stats_sources``, ``calibration_sources``, ``needs_precise``) so the matrix never tests for a
concrete class, and ``cross_source`` marks cells of the cross-source matrix (statistics of source
i evaluated on j). ``logits(ctx, j, x)`` returns (N, K) outputs and never leaves ``ctx.model``
changed (through ``use_stats``, a flag-restoring forward or a copy); ``outputs(ctx, j, x)`` returns
one such output per seeded grouping of the test samples for strategies whose result depends on how
samples are grouped into batches (``Grouped``: ``batch:B``, per-batch ``prior:N``, ``tent``).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from shiftbn._names import STATS_LABEL_PREFIXES, STATS_LABELS
from shiftbn._torch import Inputs, batch_stats_logits, concat_inputs, forward_batches
from shiftbn.adapt.context import AdaptContext
from shiftbn.adapt.prior import check_prior, prior_batch_logits, prior_stats, take_samples
from shiftbn.adapt.tent import check_lr, tent_offline_logits, tent_online_logits
from shiftbn.bn import BNStats, preserved, use_stats


def fixed_stats_logits(ctx: AdaptContext, name: str, eval_source: str, stats: BNStats | None,
                       x: Inputs) -> torch.Tensor:
    """Outputs (N, K) float32 of ``ctx.model`` in eval mode with ``stats`` loaded (``None``: its own
    running statistics); the model is left as it was."""
    desc = f"{name} on {eval_source}"
    if stats is None:
        with preserved(ctx.model):
            ctx.model.eval()
            return forward_batches(ctx.model, x, ctx.batch_size, amp=ctx.amp, progress=ctx.progress, desc=desc)
    with use_stats(ctx.model, stats):
        return forward_batches(ctx.model, x, ctx.batch_size, amp=ctx.amp, progress=ctx.progress, desc=desc)


class Strategy:
    """Base: evaluate with fixed BN statistics ``bn_stats(ctx, j)`` (``None`` = the model's own).

    Subclasses set ``name`` and override ``stats_source`` and ``bn_stats`` (or ``logits``).
    """

    name: str = "strategy"
    cross_source: bool = False
    needs_precise: bool = False
    groupings: int = 1

    def stats_source(self, ctx: AdaptContext, eval_source: str) -> str:
        """Label of the statistics used on ``eval_source`` (the table's ``stats_source`` column)."""
        raise NotImplementedError

    def cache_key(self, ctx: AdaptContext, eval_source: str) -> Hashable | None:
        """Strategies with equal keys on a source give equal outputs there; ``None``: never shared.

        Default: the statistics of the named source (``target`` on j, ``stats:j`` and ``per-source``
        share); the model's own statistics and PreciseBN have keys of their own (and no source may be
        named like their labels, see ``check_source_name``).
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

    def outputs(self, ctx: AdaptContext, eval_source: str, x: Inputs) -> list[torch.Tensor]:
        """Outputs (N, K) per seeded grouping of the test samples (``groupings`` of them); one list
        item, ``logits``, for strategies whose outputs do not depend on how samples are grouped."""
        return [self.logits(ctx, eval_source, x)]

    def logits(self, ctx: AdaptContext, eval_source: str, x: Inputs) -> torch.Tensor:
        """Outputs (N, K) float32 for the inputs ``x`` of ``eval_source`` (a tensor (N, ...) or a dataset
        read batch by batch)."""
        return fixed_stats_logits(ctx, self.name, eval_source, self.bn_stats(ctx, eval_source), x)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


class EMA(Strategy):
    """``ema``: the running statistics stored in the model (the exponential moving average from training).

    Why: the baseline every other strategy is compared with — the model as trained, no recalibration.
    Spelled ``source`` before (it collided with a data source); ``"source"`` and ``Source`` still work,
    with a ``DeprecationWarning``, for one release.
    """

    name = "ema"

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
        check_source_name(source, f"stats:{source}")
        self.source = source
        self.name = f"stats:{source}"

    def stats_source(self, ctx, eval_source):
        return self.source

    def stats_sources(self, eval_source):
        return {self.source}

    def bn_stats(self, ctx, eval_source):
        return ctx.source_stats(self.source)


def check_source_name(name: str, where: str) -> None:
    """Refuse a source name that is also a label of statistics that are no source's (``ema``, ...).

    Why: the ``stats_source`` column and ``stats:<source>`` name sources; ``ema`` (the model's own
    statistics), ``precise``, ``batch``, ``mixed-batch`` and ``prior:...`` label strategies'
    statistics there, so a source may never be called so.
    """
    if name in STATS_LABELS or name.startswith(STATS_LABEL_PREFIXES):
        fixes = {"ema": "the model's own statistics are the strategy 'ema'",
                 "precise": "PreciseBN statistics are the strategy 'precise'",
                 "batch": "prediction-time BN is the strategy 'batch:B'",
                 "mixed-batch": "prediction-time BN on mixed batches is 'batch:B:mixed'"}
        hint = fixes.get(name, "prior-weighted statistics are the strategy 'prior:N'")
        raise ValueError(f"{where}: {name!r} labels statistics that are no source's ({hint}); a source may not be "
                         f"named {sorted(STATS_LABELS)} or start with {list(STATS_LABEL_PREFIXES)}: rename the "
                         "source (SourceTaggedDataset(..., source_names=...))")


class StatsFromEach(Strategy):
    """``stats:*``: one ``StatsFrom`` per source of the dataset (the full cross-source matrix)."""

    name = "stats:*"
    cross_source = True

    def expand(self, sources):
        return [StatsFrom(s) for s in sources]


DEFAULT_GROUPINGS = 5
"""Seeded groupings of the test samples a grouping-dependent strategy is scored over by default."""


def grouping_seed(seed: int, k: int) -> int:
    """Seed of the k-th grouping of the test samples: ``seed`` itself for k = 0, derived ones after."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0])


def _check_count(value: int, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


class Grouped(Strategy):
    """A strategy whose outputs depend on how the test samples are grouped into batches.

    ``outputs`` returns one result per seeded grouping (``groupings`` of them, seeds from
    ``grouping_seed(ctx.seed, k)``); the matrix reports the metric's mean over them and its spread.
    ``logits`` is grouping 0. Subclasses implement ``grouped_logits(ctx, j, x, seed)``.
    """

    groupings: int = DEFAULT_GROUPINGS

    def cache_key(self, ctx, eval_source):
        return None

    def _suffix(self) -> str:
        return "" if self.groupings == DEFAULT_GROUPINGS else f":k={self.groupings}"

    def grouped_logits(self, ctx: AdaptContext, eval_source: str, x: Inputs, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, ctx, eval_source, x):
        return self.grouped_logits(ctx, eval_source, x, grouping_seed(ctx.seed, 0))

    def outputs(self, ctx, eval_source, x):
        return [self.grouped_logits(ctx, eval_source, x, grouping_seed(ctx.seed, k)) for k in range(self.groupings)]


class Prior(Grouped):
    """``prior:N`` (Schneider et al. 2020): per BN layer, N/(N+n) x source (the model's running
    statistics) + n/(N+n) x target statistics, means and variances each mixed linearly (the paper's
    equation, as robusta's ``BayesianBatchNorm``; not the two-component mixture's variance), the
    target statistics taken on the input the layer sees at inference (layers above it already use
    their mixed statistics); exact population moments in float64.

    Per test batch (default, ``samples=None``; the paper's prediction-time form): each batch of
    ``batch`` test samples mixes its own statistics, n = its size; the result depends on how the
    samples are grouped, so it is scored over ``groupings`` seeded groupings (``prior:N:B``,
    ``prior:N:k=K``). Few-shot (``samples=n``, ``prior:N@n``; ``prior:N@all``: every calibration
    sample): the target statistics of n seeded calibration samples, mixed once, then used for every
    test sample. ``prior:0`` is ``batch:B`` (per batch) or inference-consistent AdaBN on the n
    samples (few-shot); a huge N is ``ema``.
    """

    def __init__(self, n: float, batch: int = 64, samples: int | str | None = None,
                 groupings: int = DEFAULT_GROUPINGS) -> None:
        self.n = check_prior(n)
        self.batch = _check_count(batch, "prior:N's test batch size B", 1)
        if samples is not None and samples != "all":
            samples = _check_count(samples, "prior:N@n's number of target samples n", 1)
        self.samples = samples
        self.groupings = 1 if samples is not None else _check_count(groupings, "groupings K", 1)
        if samples is not None:
            self.name = f"prior:{self.n:g}@{samples}"
        else:
            self.name = f"prior:{self.n:g}" + ("" if batch == 64 else f":{batch}") + self._suffix()

    def stats_source(self, ctx, eval_source):
        return self.name

    def cache_key(self, ctx, eval_source):
        return None if self.samples is None else ("prior", self.n, self.samples, eval_source)

    def calibration_sources(self, eval_source):
        return set() if self.samples is None else {eval_source}

    def bn_stats(self, ctx, eval_source):
        if self.samples is None:  # per test batch: statistics differ batch by batch, none fixed
            raise NotImplementedError(f"{self.name!r} mixes each test batch's own statistics; it has no fixed ones")
        cal = ctx.calibration_inputs(eval_source)
        data = cal if self.samples == "all" else take_samples(cal, self.samples, ctx.seed)
        return prior_stats(ctx.model, data, self.n, batch_size=ctx.batch_size, amp=ctx.amp)

    def logits(self, ctx, eval_source, x):
        if self.samples is not None:
            return Strategy.logits(self, ctx, eval_source, x)
        return super().logits(ctx, eval_source, x)

    def outputs(self, ctx, eval_source, x):
        if self.samples is not None:
            return [self.logits(ctx, eval_source, x)]
        return super().outputs(ctx, eval_source, x)

    def grouped_logits(self, ctx, eval_source, x, seed):
        return prior_batch_logits(ctx.model, x, self.n, self.batch, seed, amp=ctx.amp)


class BatchStats(Grouped):
    """``batch:B``: prediction-time BN, the target evaluated in batches of B with their own statistics.

    The result depends on how test samples are grouped: it is scored over ``groupings`` seeded
    groupings (``batch:B:k=K``). ``batch:B:mixed`` draws each batch from all evaluated sources
    together, to show why batch composition matters at test time. Under ``torch.distributed`` the
    matrix deals each grouping's seeded batches to the ranks, each batch whole on one rank
    (``batch:B:mixed``: all on one rank), so the outputs equal one process's.
    """

    def __init__(self, batch: int, mixed: bool = False, groupings: int = DEFAULT_GROUPINGS) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
            raise ValueError(f"batch:B needs an integer B >= 2 (BN cannot normalize one sample), got {batch!r}")
        self.batch, self.mixed = batch, mixed
        self.groupings = _check_count(groupings, "groupings K", 1)
        self.name = f"batch:{batch}" + (":mixed" if mixed else "") + self._suffix()

    def stats_source(self, ctx, eval_source):
        return "mixed-batch" if self.mixed else "batch"

    def grouped_logits(self, ctx, eval_source, x, seed):
        if not self.mixed:
            return batch_stats_logits(ctx.model, x, self.batch, seed, amp=ctx.amp, progress=ctx.progress,
                                      desc=f"{self.name} on {eval_source}")
        return ctx.memo(("shiftbn", "mixed-batch", self.batch, seed), lambda: self._mixed(ctx, seed))[eval_source]

    def _mixed(self, ctx: AdaptContext, seed: int) -> dict[str, torch.Tensor]:
        names = list(ctx.eval_sources)
        xs = [ctx.eval_inputs(s) for s in names]
        out = batch_stats_logits(ctx.model, concat_inputs(xs), self.batch, seed, amp=ctx.amp)
        return dict(zip(names, torch.split(out, [len(v) for v in xs]), strict=True))


class Tent(Grouped):
    """``tent`` (Wang et al. 2021, the published online form): the test stream in seeded batches of
    ``batch``; each batch is predicted by the forward that computes its Adam step (lr 1e-3, betas
    (0.9, 0.999), no weight decay) on the entropy of ``BatchNorm2d`` affine parameters, every BN
    layer normalizing with batch statistics; adaptation carries over (``tent-episodic``: reset per
    batch). Scored over ``groupings`` seeded stream orders (``tent:k=K``). Runs on a copy. Under
    ``torch.distributed`` the matrix adapts and predicts each source on one rank (sources spread
    over ranks); outputs are gathered and equal one process's."""

    def __init__(self, batch: int = 64, steps: int = 1, episodic: bool = False, lr: float = 1e-3,
                 groupings: int = DEFAULT_GROUPINGS) -> None:
        self.batch = _check_count(batch, "tent's test batch size", 2)
        self.steps = _check_count(steps, "tent's steps per batch", 1)
        self.lr, self.episodic = check_lr(lr), bool(episodic)
        self.groupings = _check_count(groupings, "groupings K", 1)
        self.name = ("tent-episodic" if episodic else "tent") + self._suffix()

    def stats_source(self, ctx, eval_source):
        return "batch"

    def grouped_logits(self, ctx, eval_source, x, seed):
        return tent_online_logits(ctx.model, x, self.batch, seed, steps=self.steps, episodic=self.episodic,
                                  lr=self.lr, amp=ctx.amp)


class TentOffline(Strategy):
    """``tent-offline:S``: S Adam steps (lr 1e-3) of entropy minimization of every BN layer's affine
    parameters on random batches of ``batch`` of the target's unlabeled calibration data, on a copy
    of the model; then prediction with batch statistics in batches of ``batch`` (default 64).
    Under ``torch.distributed``: one rank per source, like ``tent``."""

    def __init__(self, steps: int, lr: float = 1e-3, batch: int = 64) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"tent-offline:S needs an integer S >= 0, got {steps!r}")
        self.steps, self.lr, self.batch = steps, check_lr(lr), _check_count(batch, "tent's batch size", 2)
        self.name = f"tent-offline:{steps}"

    def stats_source(self, ctx, eval_source):
        return "batch"

    def cache_key(self, ctx, eval_source):
        return None

    def calibration_sources(self, eval_source):
        return {eval_source}

    def logits(self, ctx, eval_source, x):
        return tent_offline_logits(ctx.model, ctx.calibration_inputs(eval_source), x, self.steps, self.batch,
                                   ctx.seed, lr=self.lr, amp=ctx.amp)


def __getattr__(name: str):
    if name == "Source":
        warnings.warn("the strategy class Source is now EMA (strategy 'ema'); Source goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return EMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
