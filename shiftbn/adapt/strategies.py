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
samples are grouped into batches (``Grouped``: ``batch:B``, per-batch ``prior:N``, ``tent``; in
``shiftbn.adapt.grouped``).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import torch

from shiftbn._names import STATS_LABEL_PREFIXES, STATS_LABELS
from shiftbn._torch import Inputs, forward_batches
from shiftbn.adapt.context import AdaptContext
from shiftbn.bn import BNStats, preserved, use_stats


def fixed_stats_logits(ctx: AdaptContext, name: str, eval_source: str, stats: BNStats | None,
                       x: Inputs) -> torch.Tensor:
    """Outputs (N, K) float32 of ``ctx.model`` in eval mode with ``stats`` loaded (``None``: its own
    running statistics); the model is left as it was."""
    desc = f"{name} on {eval_source}"
    if stats is None:
        with preserved(ctx.model):
            ctx.model.eval()
            return forward_batches(ctx.model, x, ctx.batch_size, amp=ctx.amp, progress=ctx.progress, desc=desc,
                                   runner=ctx.runner)
    with use_stats(ctx.model, stats):
        return forward_batches(ctx.model, x, ctx.batch_size, amp=ctx.amp, progress=ctx.progress, desc=desc,
                               runner=ctx.runner)


class Strategy:
    """Base of every strategy: evaluate with fixed BN statistics ``bn_stats(ctx, j)`` (``None`` = the model's own).

    Why: the matrix only calls these methods, so a strategy of your own (given to
    ``cross_source_matrix`` as an object, or by name after ``register_strategy``) is evaluated,
    cached and reported exactly as the built-in ones. Subclasses set ``name`` (the ``strategy``
    column) and override ``stats_source`` and ``bn_stats`` (fixed statistics) or ``logits`` (anything
    else); they declare what they read with ``stats_sources``, ``calibration_sources`` and the class
    attribute ``needs_precise``; ``cross_source = True`` marks cells of the cross-source matrix;
    ``groupings`` > 1 (see ``shiftbn.adapt.Grouped``) scores outputs that depend on how samples are batched.

    Args:
        None.

    Returns:
        A strategy; ``name``, ``cross_source``, ``needs_precise`` and ``groupings`` are class attributes.

    Example:
        >>> class FromLab0(Strategy):
        ...     name = "from-lab_0"
        ...     def stats_source(self, ctx, eval_source):
        ...         return "lab_0"
        ...     def stats_sources(self, eval_source):
        ...         return {"lab_0"}
        ...     def bn_stats(self, ctx, eval_source):
        ...         return ctx.source_stats("lab_0")
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [FromLab0()], progress=False)
        >>> table.strategy.unique().tolist(), table.stats_source.unique().tolist(), len(table)
        (['from-lab_0'], ['lab_0'], 4)
    """

    name: str = "strategy"
    cross_source: bool = False
    needs_precise: bool = False
    groupings: int = 1

    def stats_source(self, ctx: AdaptContext, eval_source: str) -> str:
        """Label of the statistics used on ``eval_source`` (the table's ``stats_source`` column).

        Why: the table says which statistics each cell used, separately from the strategy's name;
        a source's name for its statistics, else a label no source may take (``check_source_name``).

        Args:
            ctx: the ``AdaptContext`` of the evaluation.
            eval_source: the source being evaluated.

        Returns:
            The label (str): a source name, ``"ema"``, ``"precise"``, ``"batch"``, ... .

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> [sb.parse_strategy(s).stats_source(ctx, "lab_1") for s in ["ema", "target", "stats:lab_0", "batch:8"]]
            ['ema', 'lab_1', 'lab_0', 'batch']
        """
        raise NotImplementedError

    def cache_key(self, ctx: AdaptContext, eval_source: str) -> Hashable | None:
        """Strategies with equal keys on a source give equal outputs there; ``None``: never shared.

        Why: the matrix computes each distinct output once (``target`` on j, ``stats:j`` and
        ``per-source`` run one forward between them). Default: the statistics of the named source;
        the model's own statistics and PreciseBN have keys of their own (and no source may be named
        like their labels, see ``check_source_name``). Return ``None`` when outputs depend on anything
        else (randomness, adaptation).

        Args:
            ctx: the ``AdaptContext`` of the evaluation.
            eval_source: the source being evaluated.

        Returns:
            A hashable key, or ``None`` (the outputs are computed for this strategy alone).

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> key = sb.parse_strategy("target").cache_key
            >>> key(ctx, "lab_1") == sb.parse_strategy("stats:lab_1").cache_key(ctx, "lab_1")
            True
            >>> print(sb.parse_strategy("batch:8").cache_key(ctx, "lab_1"))
            None
        """
        return ("source-stats", self.stats_source(ctx, eval_source), eval_source)

    def stats_sources(self, eval_source: str) -> set[str]:
        """Sources whose calibration statistics this strategy reads when evaluating ``eval_source``.

        Why: the matrix refuses a plan whose strategies read statistics of a source without
        calibration samples before any pass runs, and skips the statistics pass when none is read.

        Args:
            eval_source: the source being evaluated.

        Returns:
            A set of source names (empty by default).

        Example:
            >>> sb.parse_strategy("stats:lab_0").stats_sources("lab_1"), sb.parse_strategy("ema").stats_sources("lab_1")
            ({'lab_0'}, set())
        """
        return set()

    def calibration_sources(self, eval_source: str) -> set[str]:
        """Sources whose calibration inputs this strategy reads when evaluating ``eval_source``.

        Why: strategies that adapt on raw calibration samples (``tent-offline``, few-shot ``prior``)
        need them kept; the matrix checks they exist before any pass runs.

        Args:
            eval_source: the source being evaluated.

        Returns:
            A set of source names (empty by default).

        Example:
            >>> sb.parse_strategy("tent-offline:5").calibration_sources("lab_1")
            {'lab_1'}
        """
        return set()

    def expand(self, sources: Sequence[str]) -> list[Strategy]:
        """The strategies this one stands for, given the dataset's sources (itself, by default).

        Why: a spec such as ``stats:*`` means one strategy per source, known only once the data is.

        Args:
            sources: the dataset's source names.

        Returns:
            A list of strategies (``[self]`` by default).

        Example:
            >>> sb.parse_strategy("stats:*").expand(["a", "b"]), sb.parse_strategy("ema").expand(["a", "b"])
            ([<strategy stats:a>, <strategy stats:b>], [<strategy ema>])
        """
        return [self]

    def bn_stats(self, ctx: AdaptContext, eval_source: str) -> BNStats | None:
        """The fixed BN statistics ``eval_source`` is evaluated with (``None``: the model's own).

        Why: the default ``logits`` loads these with ``use_stats`` for one forward pass and restores
        the model; a strategy that only chooses statistics overrides this and nothing else of ``logits``.

        Args:
            ctx: the ``AdaptContext`` of the evaluation (``ctx.source_stats(name)``,
                ``ctx.precise_stats()``).
            eval_source: the source being evaluated.

        Returns:
            ``BNStats`` (one entry per BN layer) or ``None``.

        Raises:
            NotImplementedError: the base class, and strategies without fixed statistics (``batch:B``).

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> print(sb.parse_strategy("ema").bn_stats(ctx, "lab_1"))
            None
            >>> sb.parse_strategy("target").bn_stats(ctx, "lab_1") is ctx.source_stats("lab_1")
            True
        """
        raise NotImplementedError

    def outputs(self, ctx: AdaptContext, eval_source: str, x: Inputs) -> list[torch.Tensor]:
        """Outputs (N, K) per seeded grouping of the test samples (``groupings`` of them).

        Why: when outputs depend on how samples are batched the matrix scores each grouping and
        reports the mean and spread; for other strategies this is one list item, ``logits``.

        Args:
            ctx: the ``AdaptContext`` of the evaluation.
            eval_source: the source being evaluated.
            x: its inputs: a tensor (N, ...) or a dataset read batch by batch.

        Returns:
            A list of ``groupings`` float32 tensors (N, K).

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> x = ctx.eval_inputs("lab_1")
            >>> [len(sb.parse_strategy(s).outputs(ctx, "lab_1", x)) for s in ["target", "batch:4", "batch:4:k=2"]]
            [1, 5, 2]
        """
        return [self.logits(ctx, eval_source, x)]

    def logits(self, ctx: AdaptContext, eval_source: str, x: Inputs) -> torch.Tensor:
        """Outputs (N, K) float32 for the inputs ``x`` of ``eval_source``.

        Why: what the metrics score. The default runs ``ctx.model`` in eval mode with ``bn_stats``
        loaded; override it for anything else, leaving ``ctx.model`` as it was (``use_stats``,
        ``preserved`` or a copy).

        Args:
            ctx: the ``AdaptContext`` of the evaluation.
            eval_source: the source being evaluated.
            x: its inputs: a tensor (N, ...) or a dataset read batch by batch.

        Returns:
            A float32 tensor (N, K) on the model's device.

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["target"]), progress=False)
            >>> sb.parse_strategy("target").logits(ctx, "lab_1", ctx.eval_inputs("lab_1")).shape
            torch.Size([6, 3])
        """
        return fixed_stats_logits(ctx, self.name, eval_source, self.bn_stats(ctx, eval_source), x)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


class EMA(Strategy):
    """``ema``: the running statistics stored in the model (the exponential moving average from training).

    Why: the baseline every other strategy is compared with — the model as trained, no recalibration.
    Spelled ``source`` before (it collided with a data source); ``"source"`` and ``Source`` still work,
    with a ``DeprecationWarning``, for one release.

    Args:
        None.

    Returns:
        The strategy ``ema`` (``stats_source`` ``"ema"``; ``bn_stats`` is ``None``: the model's own).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [EMA()], progress=False)
        >>> table.stats_source.unique().tolist(), table.eval_source.tolist()
        (['ema'], ['lab_0', 'lab_1', 'lab_2', 'lab_3'])
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
    the sources as training batches usually do (exact pooled moments; one more statistics pass).

    Why: the running averages stored in training lag the final weights (Wu & Johnson 2021); exact
    statistics of the training distribution separate that error from the shift between sources.

    Args:
        None.

    Returns:
        The strategy ``precise`` (``needs_precise``; statistics from ``ctx.precise_stats()``).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [Precise()], progress=False)
        >>> table.stats_source.unique().tolist(), len(table)
        (['precise'], 4)
    """

    name = "precise"
    needs_precise = True

    def stats_source(self, ctx, eval_source):
        return "precise"

    def cache_key(self, ctx, eval_source):
        return ("precise", eval_source)

    def bn_stats(self, ctx, eval_source):
        return ctx.precise_stats()


class Target(Strategy):
    """``target`` (AdaBN, Li et al. 2016): statistics of the evaluated source's own unlabeled calibration data.

    Why: the classic test-time fix for a shift of BN statistics: recalibrate on unlabeled target
    samples, then predict with fixed statistics (independent of how test samples are batched).

    Args:
        None.

    Returns:
        The strategy ``target`` (``stats_source``: the evaluated source itself).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [Target()], progress=False)
        >>> bool((table.stats_source == table.eval_source).all())
        True
    """

    name = "target"

    def stats_source(self, ctx, eval_source):
        return eval_source

    def stats_sources(self, eval_source):
        return {eval_source}

    def bn_stats(self, ctx, eval_source):
        return ctx.source_stats(eval_source)


class PerSource(Target):
    """``per-source`` (DSBN-style): each sample normalized with its own source's statistics.

    Why: the name of the deployment where each site keeps its own statistics (see ``shiftbn.sites``).
    Evaluating one source at a time this equals ``target`` (the matrix computes it once for both);
    it needs the source tag at test time.

    Args:
        None.

    Returns:
        The strategy ``per-source``, a ``Target`` under its own name.

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [PerSource(), Target()], progress=False)
        >>> by = table.pivot(index="eval_source", columns="strategy", values="value")
        >>> bool((by["per-source"] == by["target"]).all())
        True
    """

    name = "per-source"


class StatsFrom(Strategy):
    """``stats:<name>``: statistics of another named source (recalibrate on i, evaluate on j).

    Why: the cells of the cross-source matrix: how far source i's statistics carry to source j
    says how much of the shift BN statistics explain.

    Args:
        source: the name of the source whose calibration statistics are used.

    Returns:
        The strategy ``stats:<source>`` (``cross_source``; ``source`` holds the name).

    Raises:
        ValueError: ``source`` is empty or a label of statistics that are no source's (``ema``, ...).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [StatsFrom("lab_0")], progress=False)
        >>> table.strategy.unique().tolist(), table.stats_source.unique().tolist(), bool(table.is_cross_source.all())
        (['stats:lab_0'], ['lab_0'], True)
    """

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

    Args:
        name: a source name.
        where: what is being checked, to start the message with (e.g. ``"cross_source_matrix"``).

    Returns:
        None; ``name`` is a valid source name when this returns.

    Raises:
        ValueError: ``name`` is such a label; the message says what it labels and how to rename it.

    Example:
        >>> check_source_name("lab_a", "my data")
        >>> check_source_name("ema", "my data")
        Traceback (most recent call last):
        ...
        ValueError: my data: 'ema' labels statistics that are no source's (the model's own statistics ...
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
    """``stats:*``: one ``StatsFrom`` per source of the dataset (the full cross-source matrix).

    Why: the sources are known only once the data is; ``expand`` turns this placeholder into one
    ``stats:<name>`` per source.

    Args:
        None.

    Returns:
        The placeholder strategy ``stats:*`` (never evaluated itself).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [StatsFromEach()], progress=False)
        >>> len(table), table.strategy.unique().tolist()
        (16, ['stats:lab_0', 'stats:lab_1', 'stats:lab_2', 'stats:lab_3'])
    """

    name = "stats:*"
    cross_source = True

    def expand(self, sources):
        return [StatsFrom(s) for s in sources]


def __getattr__(name: str):
    if name == "Source":
        warnings.warn("the strategy class Source is now EMA (strategy 'ema'); Source goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return EMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
