"""Metrics, per-source evaluation and the cross-source matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from shiftbn.adapt import AdaptContext, Precise, Strategy, expand_strategies, tensor_inputs
from shiftbn.bn import collect_stats
from shiftbn.data.tagged import SourceTaggedDataset, Splits

CLASSIFICATION = ("accuracy", "balanced_accuracy", "macro_f1", "nll", "auroc", "ece")
REGRESSION = ("mae", "r2")
METRICS = CLASSIFICATION + REGRESSION


def _probs(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def metric_value(name: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """One metric of model outputs against labels.

    Classification: ``outputs`` are logits (N, K), ``y`` ints in [0, K). ``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``nll`` (log loss, nats), ``auroc`` (binary, or one-vs-rest
    macro), ``ece`` (expected calibration error, 15 bins, torchmetrics). Regression: ``outputs`` (N,)
    or (N, 1): ``mae``, ``r2``.
    """
    from sklearn import metrics as skm  # imported here: it costs ~1 s at start-up

    outputs = np.asarray(outputs)
    y = np.asarray(y)
    regression = outputs.ndim == 1 or outputs.shape[1] == 1
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
    if regression:
        if name not in REGRESSION:
            raise ValueError(f"metric {name!r} needs class logits but the model outputs one value per sample; "
                             f"use one of {REGRESSION}")
        pred = outputs.reshape(-1)
        return float(skm.mean_absolute_error(y, pred) if name == "mae" else skm.r2_score(y, pred))
    if name in REGRESSION:
        raise ValueError(f"metric {name!r} is for regression; the model outputs class logits, use one of "
                         f"{CLASSIFICATION}")
    k = outputs.shape[1]
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels span [{y.min()}, {y.max()}] but the model has {k} outputs; check the label "
                         "encoding or num_classes")
    pred = outputs.argmax(1)
    if name == "accuracy":
        return float(skm.accuracy_score(y, pred))
    if name == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(y, pred))
    if name == "macro_f1":
        return float(skm.f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0))
    p = _probs(outputs)
    if name == "nll":
        return float(skm.log_loss(y, p, labels=np.arange(k)))
    if name == "auroc":
        present = np.unique(y)
        if len(present) < 2:
            return float("nan")  # undefined with a single class present
        if k == 2:
            return float(skm.roc_auc_score(y, p[:, 1]))
        sub = p[:, present] / p[:, present].sum(1, keepdims=True)
        return float(skm.roc_auc_score(y, sub, multi_class="ovr", labels=present))
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(torch.as_tensor(p), torch.as_tensor(y), num_classes=k, n_bins=15,
                                              norm="l1"))


def _bootstrap(name: str, outputs: np.ndarray, y: np.ndarray, n_boot: int, level: float, seed: int):
    from scipy.stats import bootstrap

    res = bootstrap((np.arange(len(y)),), lambda idx: metric_value(name, outputs[idx], y[idx]),
                    n_resamples=n_boot, confidence_level=level, method="percentile", vectorized=False,
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"unknown metric(s) {bad}; choose from {METRICS}")
    return metrics


def _calibration_split(ds: SourceTaggedDataset, calibration, transductive: bool, seed: int):
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


def cross_source_matrix(
    model: nn.Module,
    ds: SourceTaggedDataset,
    strategies: Sequence[str | Strategy] = ("source", "precise", "target", "stats:*"),
    metrics: Sequence[str] = ("accuracy",),
    *,
    calibration: float | Splits | tuple = 0.5,
    transductive: bool = False,
    train_sources: Sequence[str] | None = None,
    eval_sources: Sequence[str] | None = None,
    batch_size: int = 256,
    stats_batch_size: int = 64,
    stats_mode: str = "batch",
    num_samples: int | None = None,
    ci: float | None = None,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Every strategy on every source: how the model does on each lab with which statistics.

    Why: the matrix answers "recalibrate on lab i, evaluate on lab j" and "what rescues the lab it
    never saw". Each source is split into disjoint calibration (unlabeled, for statistics) and
    evaluation samples (``calibration`` fraction, stratified, ``seed``), or both are all samples with
    ``transductive=True``. ``"stats:*"`` expands to one ``stats:<name>`` per source. Statistics of each
    source are collected once (``stats_mode``, ``stats_batch_size``, ``num_samples``) and reused;
    logits are computed once per (statistics, eval source). ``precise`` is PreciseBN over the
    calibration data of ``train_sources`` (default: all) in random mixed-source batches.
    ``ci``: add a bootstrap confidence interval at this level (``ci_low``, ``ci_high``).
    Returns a tidy DataFrame: ``strategy, stats_source, eval_source, metric, value, n``.
    The model is not changed.
    """
    if not isinstance(ds, SourceTaggedDataset):
        raise TypeError("cross_source_matrix needs a SourceTaggedDataset")
    if ds.labels is None:
        raise ValueError("evaluation needs labels; the dataset has none")
    metrics = _check_metrics(metrics)
    cal_ds, eval_ds = _calibration_split(ds, calibration, transductive, seed)
    sources = ds.sources_present
    eval_sources = list(sources if eval_sources is None else [str(s) for s in eval_sources])
    train_sources = list(sources if train_sources is None else [str(s) for s in train_sources])
    for s in eval_sources + train_sources:
        ds.source_id(s)
    strats = expand_strategies(strategies, sources)
    needed = set(eval_sources) | (set(train_sources) if any(isinstance(st, Precise) for st in strats) else set())
    empty = [s for s in needed if not (cal_ds.source_ids == ds.source_id(s)).any()]
    if empty:
        raise ValueError(f"source(s) {sorted(empty)} have no calibration samples; raise calibration, "
                         "give an explicit split, or use transductive=True")
    stats = collect_stats(model, cal_ds, batch_size=stats_batch_size, mode=stats_mode, num_samples=num_samples,
                          seed=seed, progress=progress)
    eval_parts = {s: eval_ds.subset(s) for s in eval_sources}
    eval_x = {s: tensor_inputs(part) for s, part in eval_parts.items()}
    eval_y = {s: part.labels for s, part in eval_parts.items()}
    cal_cache: dict[str, torch.Tensor] = {}

    def cal_inputs(s: str) -> torch.Tensor:
        if s not in cal_cache:
            cal_cache[s] = tensor_inputs(cal_ds.subset(s))
        return cal_cache[s]

    def precise_stats():
        return collect_stats(model, cal_ds.subset(train_sources), by_source=False, batch_size=stats_batch_size,
                             mode=stats_mode, num_samples=num_samples, seed=seed, progress=progress).pooled()

    ctx = AdaptContext(model, stats, cal_inputs, lambda s: eval_x[s], train_sources, batch_size, seed,
                       precise_stats, eval_sources)
    logits_cache: dict[tuple, np.ndarray] = {}
    rows = []
    cells = [(st, s) for st in strats for s in eval_sources]
    for strat, src in tqdm(cells, desc="matrix", disable=not progress, leave=False):
        label = strat.stats_source(ctx, src)
        key = (label, src) if strat.shares_logits else (strat.name, src)
        if key not in logits_cache:
            logits_cache[key] = strat.logits(ctx, src, eval_x[src]).numpy()
        out = logits_cache[key]
        for m in metrics:
            row = {"strategy": strat.name, "stats_source": label.split("|")[0], "eval_source": src, "metric": m,
                   "value": metric_value(m, out, eval_y[src]), "n": len(eval_y[src])}
            if ci is not None:
                row["ci_low"], row["ci_high"] = _bootstrap(m, out, eval_y[src], n_boot, ci, seed)
            rows.append(row)
    return pd.DataFrame(rows)


def evaluate(
    model: nn.Module,
    ds: SourceTaggedDataset,
    strategy: str | Strategy = "source",
    metrics: Sequence[str] = ("accuracy",),
    **kwargs,
) -> pd.DataFrame:
    """One strategy on every source: the rows of ``cross_source_matrix`` for that strategy."""
    return cross_source_matrix(model, ds, [strategy], metrics, **kwargs)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and metric: mean over eval sources, the worst source and its value, the best, and
    the best-worst gap (WILDS-style worst-group reporting). Lower is better for nll, ece and mae."""
    rows = []
    for (strategy, metric), g in table.groupby(["strategy", "metric"], sort=False):
        lower_better = metric in ("nll", "ece", "mae")
        ordered = g.sort_values("value", ascending=not lower_better)
        worst, best = ordered.iloc[0], ordered.iloc[-1]
        rows.append({"strategy": strategy, "metric": metric, "mean": g["value"].mean(),
                     "worst_source": worst["eval_source"], "worst": worst["value"],
                     "best_source": best["eval_source"], "best": best["value"],
                     "gap": abs(best["value"] - worst["value"]), "n_sources": len(g)})
    return pd.DataFrame(rows)
