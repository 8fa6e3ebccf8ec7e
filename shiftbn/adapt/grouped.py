"""Strategies whose outputs depend on how the test samples are grouped into batches.

``batch:B`` (prediction-time batch statistics), per-batch ``prior:N`` and online ``tent`` are
``Grouped``: each is scored over ``groupings`` seeded groupings (``grouping_seed``), and the matrix
reports the mean over them and their spread. Few-shot ``prior:N@n`` and offline ``tent-offline``
live here too, as their per-batch forms' siblings, but are scored once. The fixed-statistics
strategies and the ``Strategy`` protocol are in ``shiftbn.adapt.strategies``.
"""

from __future__ import annotations

import numpy as np
import torch

from shiftbn._torch import Inputs, concat_inputs
from shiftbn.adapt.context import AdaptContext
from shiftbn.adapt.prior import check_prior, prior_batch_logits, prior_stats, take_samples
from shiftbn.adapt.strategies import Strategy
from shiftbn.adapt.tent import check_lr, tent_offline_logits, tent_online_logits
from shiftbn.bn.batchstats import batch_stats_logits

DEFAULT_GROUPINGS = 5
"""Seeded groupings of the test samples a grouping-dependent strategy is scored over by default."""


def grouping_seed(seed: int, k: int) -> int:
    """Seed of the k-th grouping of the test samples: ``seed`` itself for k = 0, derived ones after.

    Why: grouping-dependent strategies are scored over several seeded batchings; grouping 0 is the
    batching ``seed`` alone gives, and the others are independent yet reproducible.

    Args:
        seed: the evaluation's seed (``ctx.seed``).
        k: the grouping's index, 0 to ``groupings - 1``.

    Returns:
        The seed (int) of the k-th grouping.

    Example:
        >>> grouping_seed(7, 0), grouping_seed(7, 1) == grouping_seed(7, 1), grouping_seed(7, 1) == 7
        (7, True, False)
    """
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

    Why: one batching is one draw; a difference between strategies smaller than the spread over
    groupings is noise, so the matrix reports both (``value``, ``value_sd``, ``groupings``).

    Args:
        None (subclasses set ``groupings``, default ``DEFAULT_GROUPINGS``).

    Returns:
        A strategy scored over ``groupings`` seeded groupings (``cache_key`` is ``None``).

    Example:
        >>> class Shuffled(Grouped):
        ...     name, groupings = "shuffled-ema", 3
        ...     def stats_source(self, ctx, eval_source):
        ...         return "ema"
        ...     def grouped_logits(self, ctx, eval_source, x, seed):
        ...         return sb.adapt.EMA().logits(ctx, eval_source, x)
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [Shuffled()], progress=False)
        >>> table.groupings.tolist(), bool(table.value_sd.max() < 1e-12)  # equal outputs: no spread
        ([3, 3, 3, 3], True)
    """

    groupings: int = DEFAULT_GROUPINGS

    def cache_key(self, ctx, eval_source):
        return None

    def _suffix(self) -> str:
        return "" if self.groupings == DEFAULT_GROUPINGS else f":k={self.groupings}"

    def grouped_logits(self, ctx: AdaptContext, eval_source: str, x: Inputs, seed: int) -> torch.Tensor:
        """Outputs (N, K) float32 of ``x`` for the grouping of the test samples that ``seed`` draws.

        Why: the one method a grouping-dependent strategy implements; ``logits`` and ``outputs``
        call it with ``grouping_seed(ctx.seed, k)``.

        Args:
            ctx: the ``AdaptContext`` of the evaluation.
            eval_source: the source being evaluated.
            x: its inputs: a tensor (N, ...) or a dataset read batch by batch.
            seed: seeds how the samples are shuffled into batches (or streamed).

        Returns:
            A float32 tensor (N, K), rows in the order of ``x``.

        Raises:
            NotImplementedError: on ``Grouped`` itself.

        Example:
            >>> from shiftbn.evaluate import collect, prepare
            >>> ds = sb.load("blobs-labs", n=60, n_features=4)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
            >>> ctx, _ = collect(model, prepare(ds, ["batch:4"]), progress=False)
            >>> BatchStats(4).grouped_logits(ctx, "lab_1", ctx.eval_inputs("lab_1"), seed=1).shape
            torch.Size([6, 3])
        """
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
    their mixed statistics); population moments, exact in float64 (per test batch: from float32
    passes over each BN input, within ~1e-7 of the float64 ones).

    Per test batch (default, ``samples=None``; the paper's prediction-time form): each batch of
    ``batch`` test samples mixes its own statistics, n = its size; the result depends on how the
    samples are grouped, so it is scored over ``groupings`` seeded groupings (``prior:N:B``,
    ``prior:N:k=K``). Few-shot (``samples=n``, ``prior:N@n``; ``prior:N@all``: every calibration
    sample): the target statistics of n seeded calibration samples, mixed once, then used for every
    test sample. ``prior:0`` is ``batch:B`` (per batch) or inference-consistent AdaBN on the n
    samples (few-shot); a huge N is ``ema``.

    Why: a few target samples give noisy statistics; the source's statistics as a prior interpolate
    between the trained model (n << N) and AdaBN (n >> N).

    Args:
        n: the prior strength N >= 0 (in samples).
        batch: test batch size B of the per-batch form (default 64).
        samples: few-shot form: the number of seeded calibration samples n, or ``"all"``; ``None``
            (default): per test batch.
        groupings: seeded groupings K the per-batch form is scored over (the few-shot form has 1).

    Returns:
        The strategy ``prior:N[:B][:k=K]`` or ``prior:N@n``; ``n``, ``batch``, ``samples`` and
        ``groupings`` hold the arguments.

    Raises:
        ValueError: N is negative or not finite, or B, n or K is not a positive integer.

    Example:
        >>> Prior(16).name, Prior(16, batch=32, groupings=3).name, Prior(0.5, samples=10).name
        ('prior:16', 'prior:16:32:k=3', 'prior:0.5@10')
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [Prior(16, batch=4, groupings=2)], progress=False)
        >>> table.strategy.unique().tolist(), table.groupings.tolist()
        (['prior:16:4:k=2'], [2, 2, 2, 2])
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
        return prior_stats(ctx.model, data, self.n, batch_size=ctx.batch_size, amp=ctx.amp, forward=ctx.runner.forward)

    def logits(self, ctx, eval_source, x):
        if self.samples is not None:
            return Strategy.logits(self, ctx, eval_source, x)
        return super().logits(ctx, eval_source, x)

    def outputs(self, ctx, eval_source, x):
        if self.samples is not None:
            return [self.logits(ctx, eval_source, x)]
        return super().outputs(ctx, eval_source, x)

    def grouped_logits(self, ctx, eval_source, x, seed):
        return prior_batch_logits(ctx.model, x, self.n, self.batch, seed, amp=ctx.amp, runner=ctx.runner)


class BatchStats(Grouped):
    """``batch:B``: prediction-time BN, the target evaluated in batches of B with their own statistics.

    The result depends on how test samples are grouped: it is scored over ``groupings`` seeded
    groupings (``batch:B:k=K``). ``batch:B:mixed`` draws each batch from all evaluated sources
    together, to show why batch composition matters at test time. Under ``torch.distributed`` the
    matrix deals each grouping's seeded batches to the ranks, each batch whole on one rank
    (``batch:B:mixed``: all on one rank), so the outputs equal one process's.

    Why: the simplest test-time adaptation (prediction-time BN, Nado et al. 2020), and the
    reference for how much batch size and composition move the result.

    Args:
        batch: the test batch size B >= 1 (B = 1: each case normalized by its own statistics, which needs
            dense inputs such as images; a BN layer that gets one value per channel is refused when it runs).
        mixed: draw each batch from all evaluated sources together (``stats_source`` ``"mixed-batch"``).
        groupings: seeded groupings K the metric is scored over (default ``DEFAULT_GROUPINGS``).

    Returns:
        The strategy ``batch:B[:mixed][:k=K]``; ``batch``, ``mixed`` and ``groupings`` hold the arguments.

    Raises:
        ValueError: B is not an integer >= 1, or K not an integer >= 1.

    Example:
        >>> BatchStats(64).name, BatchStats(8, mixed=True, groupings=3).name
        ('batch:64', 'batch:8:mixed:k=3')
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [BatchStats(4, groupings=2)], progress=False)
        >>> table.stats_source.unique().tolist(), table.groupings.tolist()
        (['batch'], [2, 2, 2, 2])
    """

    def __init__(self, batch: int, mixed: bool = False, groupings: int = DEFAULT_GROUPINGS) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch:B needs an integer B >= 1 (B = 1 only for dense outputs: one image has many "
                             f"positions per channel, one feature vector has one), got {batch!r}")
        self.batch, self.mixed = batch, mixed
        self.groupings = _check_count(groupings, "groupings K", 1)
        self.name = f"batch:{batch}" + (":mixed" if mixed else "") + self._suffix()

    def stats_source(self, ctx, eval_source):
        return "mixed-batch" if self.mixed else "batch"

    def grouped_logits(self, ctx, eval_source, x, seed):
        if not self.mixed:
            return batch_stats_logits(ctx.model, x, self.batch, seed, amp=ctx.amp, progress=ctx.progress,
                                      desc=f"{self.name} on {eval_source}", runner=ctx.runner)
        return ctx.memo(("shiftbn", "mixed-batch", self.batch, seed), lambda: self._mixed(ctx, seed))[eval_source]

    def _mixed(self, ctx: AdaptContext, seed: int) -> dict[str, torch.Tensor]:
        names = list(ctx.eval_sources)
        xs = [ctx.eval_inputs(s) for s in names]
        out = batch_stats_logits(ctx.model, concat_inputs(xs), self.batch, seed, amp=ctx.amp, runner=ctx.runner)
        return dict(zip(names, torch.split(out, [len(v) for v in xs]), strict=True))


class Tent(Grouped):
    """``tent`` (Wang et al. 2021, the published online form): the test stream in seeded batches of
    ``batch``; each batch is predicted by the forward that computes its Adam step (lr 1e-3, betas
    (0.9, 0.999), no weight decay) on the entropy of ``BatchNorm2d`` affine parameters, every BN
    layer normalizing with batch statistics; adaptation carries over (``tent-episodic``: reset per
    batch). Scored over ``groupings`` seeded stream orders (``tent:k=K``). Runs on a copy. Under
    ``torch.distributed`` the matrix adapts and predicts each source on one rank (sources spread
    over ranks); outputs are gathered and equal one process's.

    Why: batch statistics correct the first two moments only; Tent also moves BN's scale and shift
    from the predictions' entropy, without labels.

    Args:
        batch: test batch size (>= 1, default 64; 1: case by case, for dense outputs such as a U-Net's).
        steps: Adam steps per batch (>= 1, default 1: the published form).
        episodic: reset parameters and optimizer before each batch (``tent-episodic``).
        lr: Adam's learning rate (> 0, default 1e-3).
        groupings: seeded stream orders K the metric is scored over (default ``DEFAULT_GROUPINGS``).
        all_bn: adapt every BN layer's affine parameters (``BatchNorm1d``/``3d`` too: a 3-D U-Net;
            ``tent:all``); the published form, and the default, adapts ``BatchNorm2d`` only.

    Returns:
        The strategy ``tent[-episodic][:all][:k=K]``; the arguments are held as attributes.

    Raises:
        ValueError: an argument is out of range; the message names it.

    Example:
        >>> Tent().name, Tent(episodic=True, groupings=3).name, Tent(batch=16).batch
        ('tent', 'tent-episodic:k=3', 16)
    """

    def __init__(self, batch: int = 64, steps: int = 1, episodic: bool = False, lr: float = 1e-3,
                 groupings: int = DEFAULT_GROUPINGS, all_bn: bool = False) -> None:
        self.batch = _check_count(batch, "tent's test batch size", 1)
        self.steps = _check_count(steps, "tent's steps per batch", 1)
        self.lr, self.episodic, self.all_bn = check_lr(lr), bool(episodic), bool(all_bn)
        self.groupings = _check_count(groupings, "groupings K", 1)
        self.name = ("tent-episodic" if episodic else "tent") + (":all" if self.all_bn else "") + self._suffix()

    def stats_source(self, ctx, eval_source):
        return "batch"

    def grouped_logits(self, ctx, eval_source, x, seed):
        return tent_online_logits(ctx.model, x, self.batch, seed, steps=self.steps, episodic=self.episodic,
                                  lr=self.lr, amp=ctx.amp, all_bn=self.all_bn, runner=ctx.runner)


class TentOffline(Strategy):
    """``tent-offline:S``: S Adam steps (lr 1e-3) of entropy minimization of every BN layer's affine
    parameters on random batches of ``batch`` of the target's unlabeled calibration data, on a copy
    of the model; then prediction with batch statistics in batches of ``batch`` (default 64).
    Under ``torch.distributed``: one rank per source, like ``tent``.

    Why: adapting on calibration data first separates the adaptation from the test stream, so every
    test sample is predicted by the same adapted model (``tent-offline:0`` is ``batch:B``).

    Args:
        steps: Adam steps S >= 0 on calibration batches.
        lr: Adam's learning rate (> 0, default 1e-3).
        batch: calibration and prediction batch size (>= 2, default 64).

    Returns:
        The strategy ``tent-offline:S``; ``steps``, ``lr`` and ``batch`` hold the arguments.

    Raises:
        ValueError: S is not an integer >= 0, or ``lr`` or ``batch`` is out of range.

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = sb.cross_source_matrix(model, ds, [TentOffline(2, batch=8)], progress=False)
        >>> table.strategy.unique().tolist(), table.stats_source.unique().tolist()
        (['tent-offline:2'], ['batch'])
    """

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
                                   ctx.seed, lr=self.lr, amp=ctx.amp, runner=ctx.runner)
