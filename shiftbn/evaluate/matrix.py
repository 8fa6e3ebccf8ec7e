"""The cross-source matrix in three steps: prepare sources and splits, collect statistics and inputs,
score every (strategy, eval source) cell."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from shiftbn._forward import Forward, Runner, check_forward
from shiftbn._log import ShiftbnWarning, bars_wanted
from shiftbn._torch import check_device
from shiftbn.adapt import AdaptContext, Strategy, check_source_name, expand_strategies
from shiftbn.bn import CollectMode, collect_stats
from shiftbn.bn.distributed import world_and_rank
from shiftbn.data.tagged import SourceTaggedDataset, Splits, require_tagged
from shiftbn.evaluate import spread
from shiftbn.evaluate.metrics import METRICS, check_metrics, get_metric, metric_value
from shiftbn.evaluate.tapped import TappedLabels
from shiftbn.evaluate.task import DEFAULT_METRICS, infer_task
from shiftbn.evaluate.uncertainty import bootstrap_interval

Calibration = float | Splits | tuple[SourceTaggedDataset, SourceTaggedDataset]

MIN_STATS_SAMPLES = 16
"""Statistics from fewer samples per source draw a ``ShiftbnWarning``: BN's batch statistics degrade
markedly below 16 samples (Wu & He 2018, Group Normalization, Fig. 1), and the relative standard error
of a channel's variance is still sqrt(2 / 15) ~ 37% there."""


@dataclass
class MatrixPlan:
    """Step 1's result: which data calibrates, which is evaluated, which strategies on which sources.

    Why: ``prepare`` checks everything that can fail before any statistics are collected;
    ``collect`` and ``score`` then read this plan instead of re-deriving splits and sources.

    Args:
        calibration: the samples strategies compute statistics from (their labels unused).
        evaluation: the samples that are scored.
        strategies: the expanded ``Strategy`` objects (``stats:*`` already one per source).
        eval_sources: the sources evaluated, in table order.
        train_sources: the sources the model was trained on (``precise`` pools them).

    Returns:
        A ``MatrixPlan`` holding these five fields.

    Example:
        >>> plan = prepare(sb.load("blobs-labs", n=60, n_features=4), ["target", "precise"])
        >>> plan.eval_sources, len(plan.calibration) + len(plan.evaluation)
        (['lab_0', 'lab_1', 'lab_2', 'lab_3'], 60)
    """

    calibration: SourceTaggedDataset
    evaluation: SourceTaggedDataset
    strategies: list[Strategy]
    eval_sources: list[str]
    train_sources: list[str]


def prepare(
    ds: SourceTaggedDataset,
    strategies: Sequence[str | Strategy] | str | Strategy,
    *,
    calibration: Calibration = 0.5,
    transductive: bool = False,
    train_sources: Sequence[str] | None = None,
    eval_sources: Sequence[str] | None = None,
    seed: int = 0,
) -> MatrixPlan:
    """Split each source into calibration and evaluation samples and check every strategy's needs.

    Why: step 1 of ``cross_source_matrix``; a bad split, an unknown source or a source a strategy
    needs but that has no calibration sample fails here, before any forward pass.

    Args:
        ds: a labeled ``SourceTaggedDataset``.
        strategies: ``Strategy`` objects or spec strings, as ``cross_source_matrix``'s.
        calibration: fraction of each source (stratified, ``seed``) used unlabeled for statistics, a
            ``Splits`` (its calibration and test parts) or a ``(calibration, eval)`` pair.
        transductive: calibrate and evaluate on all samples.
        train_sources: the sources the model was trained on (default: all).
        eval_sources: the sources to evaluate (default: all).
        seed: seed of the calibration split.

    Returns:
        A ``MatrixPlan``.

    Raises:
        TypeError: ``ds`` is not a ``SourceTaggedDataset``.
        ValueError: ``calibration`` is not a fraction in (0, 1), a ``Splits`` or a pair; a source is
            unknown or its name is a statistics label; a needed source has no calibration sample.

    Example:
        >>> plan = prepare(sb.load("blobs-labs", n=60, n_features=4), ["target", "precise"], calibration=0.5)
        >>> [st.name for st in plan.strategies], len(plan.calibration), len(plan.evaluation)
        (['target', 'precise'], 31, 29)
    """
    require_tagged(ds, "cross_source_matrix")
    cal_ds, eval_ds = calibration_split(ds, calibration, transductive, seed)
    sources = ds.sources_present
    for s in sources:  # source names and the labels of strategies' statistics share the stats_source column
        check_source_name(s, "cross_source_matrix")
    evals = list(sources if eval_sources is None else [str(s) for s in eval_sources])
    trains = list(sources if train_sources is None else [str(s) for s in train_sources])
    for s in evals + trains:
        ds.source_id(s)
    strats = expand_strategies(strategies, sources)
    needed = set()
    for st in strats:
        for j in evals:
            needed |= st.stats_sources(j) | st.calibration_sources(j)
        if st.needs_precise:
            needed |= set(trains)
    present = set(cal_ds.sources_present)  # by name: a given calibration set numbers its own sources
    empty = [s for s in needed if s not in present]
    if empty:
        raise ValueError(f"source(s) {sorted(empty)} have no calibration samples; raise calibration, "
                         "give an explicit split, or use transductive=True")
    return MatrixPlan(cal_ds, eval_ds, strats, evals, trains)


def calibration_split(ds: SourceTaggedDataset, calibration: Calibration, transductive: bool, seed: int):
    """The (calibration, evaluation) datasets ``prepare`` uses: the one rule for splitting each source."""
    if transductive:
        return ds, ds
    if isinstance(calibration, Splits):
        return calibration.calibration, calibration.test
    if isinstance(calibration, tuple) and len(calibration) == 2:
        return calibration
    if not isinstance(calibration, (int, float)) or not 0 < calibration < 1:
        raise ValueError(f"calibration must be a fraction in (0, 1), a Splits or a (calibration, eval) pair; "
                         f"got {calibration!r}")
    sp = ds.split(fractions=(0.0, float(calibration), 1.0 - float(calibration)), seed=seed)
    return sp.calibration, sp.test


def collect(
    model: nn.Module,
    plan: MatrixPlan,
    *,
    batch_size: int = 256,
    stats_batch_size: int = 64,
    stats_mode: CollectMode = "batch",
    num_samples: int | None = None,
    seed: int = 0,
    amp: bool = False,
    progress: bool = True,
    forward: Forward | None = None,
    task: str | None = None,
    metrics: Sequence[str] | None = None,
) -> tuple[AdaptContext, Mapping[str, np.ndarray]]:
    """The context strategies see (statistics computed on first use) and each eval source's labels.

    Why: step 2 of ``cross_source_matrix``; nothing is computed yet, so a strategy that needs no
    per-source statistics never pays for them. Inputs are handed to strategies as dataset views,
    read batch by batch: memory is O(batch), plus the outputs kept for scoring (N x K per cell),
    never the inputs.

    Args:
        model: the network under evaluation (not changed).
        plan: ``prepare``'s result.
        batch_size: evaluation batch size.
        stats_batch_size: ``collect_stats``'s ``batch_size`` for the statistics.
        stats_mode: ``collect_stats``'s ``mode``.
        num_samples: ``collect_stats``'s ``num_samples`` (default: all calibration samples).
        seed: seed of the statistics' batches and of strategies' groupings.
        amp: forwards under autocast.
        progress: show progress bars.
        forward: ``forward(model, x)`` run on every batch instead of ``model(x)`` (statistics and
            strategies alike).
        task: ``"classification"``, ``"regression"`` or ``"segmentation"``; default: read from the
            targets (``evaluate.task.infer_task``). For segmentation every batch's outputs are scored
            per case as they stream (``evaluate.dense.CaseScorer``) and strategies return those
            per-case rows, never the dense outputs.
        metrics: the metric names ``score`` will compute; segmentation: per-class ones (``dice:<c>``) are
            checked against the outputs' channel count at the first batch (default: unchecked).

    Returns:
        ``(ctx, labels)``: the ``AdaptContext`` strategies read, and eval source -> (N,) labels. Labels
        are the dataset's own, else read from the items as the first evaluation of each source reads
        them (``TappedLabels``: never a pass over the images just for labels), then available once
        that source's first cell is computed. Segmentation: the case positions 0..N-1 (the targets
        are scored inside the pass).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> ctx, labels = collect(model, prepare(ds, ["target", "precise"]), progress=False)
        >>> type(ctx).__name__, list(labels), labels["lab_0"].shape
        ('AdaptContext', ['lab_0', 'lab_1', 'lab_2', 'lab_3'], (6,))
    """
    check_forward(forward)
    check_num_samples(num_samples)
    task = infer_task(plan.evaluation, task)
    eval_parts = {s: plan.evaluation.subset(s) for s in plan.eval_sources}
    if task == "segmentation":
        labels: Mapping[str, np.ndarray] = {s: np.arange(len(p)) for s, p in eval_parts.items()}
        runner = Runner(forward=forward, reduce=case_scorer(metrics))
        inputs = eval_parts.__getitem__
    else:
        labels = TappedLabels(eval_parts, regression=task == "regression")
        labels.check_first()
        runner = Runner(forward=forward)
        inputs = labels.inputs
    cal = plan.calibration

    def source_stats():
        return warn_few_samples(collect_stats(model, cal, batch_size=stats_batch_size, mode=stats_mode,
                                              num_samples=num_samples, seed=seed, amp=amp, progress=progress,
                                              forward=forward))

    def precise_stats():
        return warn_few_samples(collect_stats(model, cal.subset(plan.train_sources), by_source=False,
                                              batch_size=stats_batch_size, mode=stats_mode, num_samples=num_samples,
                                              seed=seed, amp=amp, progress=progress, forward=forward)).pooled()

    ctx = AdaptContext(model=model, source_stats_fn=source_stats,
                       calibration_inputs=lambda s: ctx.memo(("shiftbn", "calibration", s), lambda: cal.subset(s)),
                       eval_inputs=inputs, train_sources=plan.train_sources,
                       eval_sources=plan.eval_sources, precise_stats_fn=precise_stats, batch_size=batch_size,
                       seed=seed, amp=amp, progress=progress, runner=runner, task=task)
    return ctx, labels


def score(
    ctx: AdaptContext,
    plan: MatrixPlan,
    labels: Mapping[str, np.ndarray],
    metrics: Sequence[str],
    *,
    ci: float | None = None,
    n_boot: int = 200,
    progress: bool = True,
    keep_outputs: dict | None = None,
) -> pd.DataFrame:
    """Outputs of every (strategy, eval source) cell, computed once per cache key, and their metrics.

    Why: step 3 of ``cross_source_matrix``; cells that share statistics share one forward pass, and
    ``keep_outputs`` hands the outputs on to ``paired_table``/``pooled_table`` without a second pass.

    Args:
        ctx: ``collect``'s context.
        plan: ``prepare``'s result.
        labels: ``collect``'s labels.
        metrics: metric names (checked: ``check_metrics``).
        ci: add a percentile bootstrap interval at this level (``ci_low``, ``ci_high``) resampled
            within the cell's eval source.
        n_boot: number of resamples for ``ci``.
        progress: show a progress bar over the cells.
        keep_outputs: a dict filled with ``(strategy name, eval source) -> outputs`` (N x K numpy, in
            the order of ``labels[eval source]``), for paired comparisons and calibration.

    Returns:
        The matrix table, as ``cross_source_matrix``'s. A strategy whose outputs depend on how test
        samples are grouped (``Strategy.outputs``: ``batch:B``, per-batch ``prior:N``, ``tent``) gets
        ``value`` = the mean over its ``groupings`` seeded groupings and ``value_sd`` = their standard
        deviation (NaN for one grouping); ``ci_low``/``ci_high`` and ``keep_outputs`` are those of
        grouping 0 (the grouping that ``seed`` gives).

    Raises:
        ValueError: a strategy produced NaN or infinite outputs.

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> plan = prepare(ds, ["target", "precise"])
        >>> ctx, labels = collect(model, plan, progress=False)
        >>> kept = {}
        >>> table = score(ctx, plan, labels, ["accuracy"], progress=False, keep_outputs=kept)
        >>> len(table), kept[("target", "lab_0")].shape
        (8, (6, 3))
    """
    outputs: dict = {}
    rows = []
    cells = [(st, s) for st in plan.strategies for s in plan.eval_sources]
    keys = [st.cache_key(ctx, s) for st, s in cells]
    last_use = {key: i for i, key in enumerate(keys) if key is not None}  # shared outputs live until then
    world = world_and_rank()[0]
    if world > 1:
        spread.prefetch(ctx, plan.strategies, plan.eval_sources)
    ahead: dict[int, torch.Tensor] = {}  # distributed: a strategy's cells computed by all ranks at once
    for i, (strat, src) in enumerate(tqdm(cells, desc="matrix cells", disable=not bars_wanted(progress),
                                          unit="cell")):
        key = keys[i]
        outs = outputs.get(key) if key is not None else None
        if outs is None and world > 1 and i not in ahead:
            todo = [m for m in range(i, len(cells))
                    if cells[m][0] is strat and (keys[m] is None or keys[m] not in outputs)]
            got = spread.strategy_outputs(ctx, strat, [cells[m][1] for m in todo])
            ahead.update({m: got[cells[m][1]] for m in todo})
        if outs is None:
            raws = ahead.pop(i) if i in ahead else strat.outputs(ctx, src, ctx.eval_inputs(src))
            outs = [checked_outputs(strat, src, o) for o in raws]
            if key is not None and last_use[key] > i:
                outputs[key] = outs
        if key is not None and last_use[key] == i:
            outputs.pop(key, None)
        if keep_outputs is not None:
            keep_outputs[(strat.name, src)] = outs[0]
        y, scored = labeled_part(labels[src], outs)
        if not len(y):
            continue  # an unlabeled source: no label metric, no row (its outputs are still kept)
        for m in metrics:
            values = [metric_value(m, o, y) for o in scored]
            row = {"strategy": strat.name, "is_cross_source": strat.cross_source,
                   "stats_source": strat.stats_source(ctx, src), "eval_source": src, "metric": m,
                   "value": float(np.mean(values)), "n": len(y), "groupings": len(scored),
                   "value_sd": float(np.std(values, ddof=1)) if len(scored) > 1 else np.nan}
            if ci is not None:
                _, row["ci_low"], row["ci_high"] = bootstrap_interval(scored[0], y, m, n_boot=n_boot, level=ci,
                                                                      seed=ctx.seed)
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else _COLUMNS)


_COLUMNS = ["strategy", "is_cross_source", "stats_source", "eval_source", "metric", "value", "n", "groupings",
            "value_sd"]


def labeled_part(y: np.ndarray, outs: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The labeled samples of one cell: class labels -1 (unlabeled) dropped from ``y`` and every output.

    Why: a new site often has no labels, or some; label metrics score the labeled part only, and a
    source with none gets no label-metric row rather than a failure or a number about nothing.
    Only integer class labels of classification outputs (N, K) are masked: -1 is a valid regression
    target and a label map's -1 is the metric's own business.
    """
    y = np.asarray(y)
    o = np.asarray(outs[0])
    if y.ndim != 1 or y.dtype.kind not in "iu" or o.ndim != 2 or o.shape[1] < 2 or not (y < 0).any():
        return y, outs
    keep = y >= 0
    return y[keep], [np.asarray(out)[keep] for out in outs]


def checked_outputs(strat: Strategy, src: str, out: torch.Tensor) -> np.ndarray:
    """Outputs as numpy, refused when any is NaN or infinite (an argmax of NaN would score as class 0)."""
    out = out.detach().float().cpu()
    bad = ~torch.isfinite(out.reshape(len(out), -1)).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"strategy {strat.name!r} produced NaN or infinite outputs for {int(bad.sum())} of "
                         f"{len(out)} samples of source {src!r}; check the model's precision and inputs")
    return out.numpy()


def cross_source_matrix(
    model: nn.Module,
    ds: SourceTaggedDataset,
    strategies: Sequence[str | Strategy] | str | Strategy = ("ema", "precise", "target", "stats:*"),
    metrics: Sequence[str] | str | None = None,
    *,
    calibration: Calibration = 0.5,
    transductive: bool = False,
    train_sources: Sequence[str] | None = None,
    eval_sources: Sequence[str] | None = None,
    batch_size: int = 256,
    stats_batch_size: int = 64,
    stats_mode: CollectMode = "batch",
    num_samples: int | None = None,
    ci: float | None = None,
    n_boot: int = 200,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = True,
    forward: Forward | None = None,
    task: str | None = None,
) -> pd.DataFrame:
    """Every strategy on every source: how the model does on each lab with which statistics.

    Why: the matrix answers "recalibrate on lab i, evaluate on lab j" and "what rescues the lab it
    never saw". Statistics of each source are collected once, only when a strategy needs them, and
    outputs are computed once per (statistics, eval source). The model is not changed.

    Args:
        model: the network under evaluation.
        ds: a labeled ``SourceTaggedDataset``.
        strategies: ``Strategy`` objects (``sb.adapt.EMA()``, ``sb.adapt.Prior(16)``...) or spec strings
            (``"prior:16"``); ``StatsFromEach()``/``"stats:*"`` expands to one per source.
        metrics: names from the metric table (``shiftbn.evaluate.METRICS``); default: the task's
            (``accuracy``; ``mae``; ``dice`` and ``hd95`` for segmentation).
        calibration: fraction of each source (stratified, ``seed``) used unlabeled for statistics, a
            ``Splits`` (its calibration and test parts) or a ``(calibration, eval)`` pair.
        transductive: calibrate and evaluate on all samples.
        train_sources: the sources the model was trained on (``precise`` pools their calibration
            data in random mixed batches); default: all. Leave out the held-out sources (the CLI's
            ``--held-out``), or ``precise`` counts them as training sources.
        eval_sources: the sources to evaluate (default: all).
        batch_size: evaluation batch size. ``stats_batch_size``, ``stats_mode``, ``num_samples``:
            as ``collect_stats``'s ``batch_size``, ``mode``, ``num_samples``.
        ci: add a percentile bootstrap interval at this level (``ci_low``, ``ci_high``; ``n_boot``
            resamples), stratified by construction: each cell resamples its own eval source's samples.
        device: where inputs go; must be the model's device (default: the model's). The model is
            never moved.
        amp: forwards under autocast (float16 on CUDA, bfloat16 on CPU); BN statistics are still
            accumulated in float64 from the tensor each BN layer receives.
        seed: seed of the calibration split, the statistics' batches, groupings and resamples.
        progress: show progress bars.
        forward: ``forward(model, x) -> outputs`` run on every batch of inputs ``x`` (on the model's
            device) instead of ``model(x)``: multi-input models, dict inputs, sliding-window inference,
            micro-batches. Used for the statistics and by every strategy.
        task: ``"classification"``, ``"regression"`` or ``"segmentation"``; default: read from the
            targets (a label map per sample is segmentation). Segmentation is scored per case (sample
            or volume) as the outputs stream, never keeping them: ``value`` is the mean over cases,
            ``n`` the number of cases, intervals resample cases.

    Returns:
        Tidy DataFrame ``strategy, is_cross_source, stats_source, eval_source, metric, value, n,
        groupings, value_sd``; ``is_cross_source`` marks the ``stats:<i>`` cells; ``groupings``: seeded
        groupings of the test samples ``value`` averages (1 unless the strategy depends on them),
        ``value_sd`` their standard deviation (NaN for 1). Source names may not be labels of
        strategies' statistics (``ema``, ``precise``, ``batch``, ``mixed-batch``, ``prior:...``).
        Unlabeled samples (class label -1) are used for statistics but never scored: ``n`` counts
        the labeled evaluation samples, and a source with none has no rows.

    Raises:
        ValueError: an unknown metric, a device other than the model's, or any of ``prepare``'s.

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> table = cross_source_matrix(model, ds, ["target", "precise"], ["accuracy"], progress=False)
        >>> table.shape, sorted(table.strategy.unique()), int(table["n"].sum())
        ((8, 9), ['precise', 'target'], 58)
    """
    check_device(model, device)
    plan = prepare(ds, strategies, calibration=calibration, transductive=transductive, train_sources=train_sources,
                   eval_sources=eval_sources, seed=seed)
    task = infer_task(plan.evaluation, task)
    names = plan.evaluation.class_names
    metrics = task_metrics(metrics, task, None if names is None else len(names))
    ctx, labels = collect(model, plan, batch_size=batch_size, stats_batch_size=stats_batch_size,
                          stats_mode=stats_mode, num_samples=num_samples, seed=seed, amp=amp, progress=progress,
                          forward=forward, task=task, metrics=metrics)
    return score(ctx, plan, labels, metrics, ci=ci, n_boot=n_boot, progress=progress)


def check_num_samples(num_samples: int | None, flag: str = "num_samples") -> None:
    """``ValueError`` for a cap below 2 samples per source: one sample has no variance to estimate (BN layers
    without spatial positions refuse it; a conv layer would silently take one image's spatial spread)."""
    if isinstance(num_samples, numbers.Integral) and not isinstance(num_samples, bool) and num_samples < 2:
        raise ValueError(f"{flag} must be >= 2 samples per source (one sample has no variance to estimate), got "
                         f"{num_samples}; leave {flag} out to use every calibration sample, or give "
                         f"{MIN_STATS_SAMPLES} or more")


def warn_few_samples(stats):
    """``stats`` (``SourceStats``), after one ``ShiftbnWarning`` naming the sources whose statistics come
    from fewer than ``MIN_STATS_SAMPLES`` samples."""
    few = {name: int(bn.num_samples) for name, bn in stats.sources.items() if bn.num_samples < MIN_STATS_SAMPLES}
    if few:
        listed = ", ".join(f"{name}: {n}" for name, n in few.items())
        warnings.warn(f"BN statistics from fewer than {MIN_STATS_SAMPLES} samples ({listed}) are noisy; their "
                      "matrix cells are doubtful: calibrate on more samples (num_samples / --num-samples, "
                      "calibration / --calibration)", ShiftbnWarning, stacklevel=2)
    return stats


def case_scores(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-case segmentation scores (B, R) of one batch (``evaluate.dense.CaseScorer``; K from the outputs)."""
    from shiftbn.evaluate.dense import CaseScorer

    return CaseScorer(int(outputs.shape[1]))(outputs, targets)


def task_metrics(metrics: Sequence[str] | str | None, task: str, num_classes: int | None = None) -> list[str]:
    """The metric names to score: ``metrics`` checked against the task, or the task's defaults; per-class
    segmentation metrics (``dice:<c>``) also against ``num_classes`` (the data's, background included) when known."""
    names = list(DEFAULT_METRICS[task]) if metrics is None else check_metrics(metrics)
    wrong = misfit_metrics(names, task)
    if wrong:
        raise ValueError(f"metric(s) {wrong} do not fit this {task} data (its targets decide the task; pass task= "
                         f"if that is wrong); use one of {task_metric_names(task)}")
    if task == "segmentation" and num_classes is not None:
        check_metric_classes(names, num_classes, "metrics=")
    return names


def check_metric_classes(names: Sequence[str], num_classes: int, flag: str, *, source: str = "data") -> None:
    """``ValueError`` naming ``flag`` (the option) when a per-class metric (``dice:<c>``) of ``names`` asks for a class
    that is not a foreground class 1..K-1 of ``num_classes`` K; ``source``: ``"data"`` (its class names) or
    ``"outputs"`` (the model's channels)."""
    from shiftbn.evaluate.dense import parse_dense_name

    parsed = {n: parse_dense_name(n) for n in names}
    bad = [n for n, p in parsed.items() if p is not None and p[1] is not None and not 1 <= p[1] < num_classes]
    if not bad:
        return
    has = (f"the data has {num_classes} classes (0 is background)" if source == "data" else
           f"the model's outputs have {num_classes} channels, classes 0..{num_classes - 1} (0 is background)")
    fix = (f"a per-class metric takes a foreground class 1..{num_classes - 1}, e.g. "
           f"'{parsed[bad[0]][0]}:{num_classes - 1}'" if num_classes > 1 else "there is no foreground class")
    raise ValueError(f"metric(s) {bad} ({flag}) ask for a class that is not there: {has}, so {fix}")


def case_scorer(metrics: Sequence[str] | None = None):
    """``case_scores`` that first checks the per-class metrics of ``metrics`` against the first batch's
    channel count (K), so a class the model does not output fails at once, not after a full pass."""
    checked = []

    def reduce(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        if metrics and not checked:
            check_metric_classes(metrics, int(outputs.shape[1]), "metrics=", source="outputs")
            checked.append(True)
        return case_scores(outputs, targets)

    return reduce


def misfit_metrics(names: Sequence[str], task: str) -> list[str]:
    """The names among ``names`` whose metric is for another task than ``task``."""
    return [m for m in names if get_metric(m).task != task]


def task_metric_names(task: str) -> list[str]:
    """The names of the metric table's entries for ``task``."""
    return [n for n, m in METRICS.items() if m.task == task]
