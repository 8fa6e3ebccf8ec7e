"""The metric table: name -> function, direction, bounds, task. Everything that scores reads it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch

from shiftbn.evaluate.dense import case_values, parse_dense_name

Task = Literal["classification", "regression", "segmentation"]
# The normal quantile of 0.95: a central 90% interval is mean +- _Z90 sd.
_Z90 = 1.6448536269514722


@dataclass(frozen=True)
class Metric:
    """One metric: ``fn(outputs, y) -> float``; whether higher is better; whether it lies in [0, 1].

    Why: one table entry tells every scorer (the matrix, ``summarize``, the bootstrap) how to compute
    the metric and which way is worse, so no caller hard-codes a metric's direction.

    Args:
        name: the name the table, tables' ``metric`` column and ``--metrics`` use.
        fn: ``fn(outputs, y) -> float``. Classification metrics get logits (N, K) and int labels in
            [0, K); regression metrics get outputs (N,), (N, 1) or (N, 2) = (mean, standard deviation)
            and float targets (N,); segmentation metrics get the (N, R) per-case rows of
            ``evaluate.dense.CaseScorer`` and ``y`` of length N (unused).
        higher_is_better: whether a larger value is better (``summarize``'s worst source follows it).
        bounded: whether every value lies in [0, 1].
        task: ``"classification"``, ``"regression"`` or ``"segmentation"``.

    Returns:
        A frozen ``Metric`` holding these five fields; ``register_metric`` adds it to the table.

    Example:
        >>> top1 = Metric("top1", lambda out, y: float((out.argmax(1) == y).mean()), True, True, "classification")
        >>> top1.fn(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
        0.5
    """

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool
    bounded: bool
    task: Task


def _probs(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def _skm():
    from sklearn import metrics as skm  # imported here: it costs ~1 s at start-up

    return skm


def _accuracy(out, y):
    # sklearn's accuracy_score is this mean (exact: a count over n); computed here, the default metric does not
    # import sklearn and scipy.stats (seconds of start-up for every matrix)
    return float(np.mean(np.asarray(y).reshape(-1) == out.argmax(1)))


def _balanced_accuracy(out, y):
    return float(_skm().balanced_accuracy_score(y, out.argmax(1)))


def _macro_f1(out, y):
    return float(_skm().f1_score(y, out.argmax(1), average="macro", labels=np.unique(y), zero_division=0))


def _nll(out, y):
    return float(_skm().log_loss(y, _probs(out), labels=np.arange(out.shape[1])))


def _auroc(out, y):
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")  # undefined with a single class present
    p = _probs(out)
    if out.shape[1] == 2:
        return float(_skm().roc_auc_score(y, p[:, 1]))
    sub = p[:, present] / p[:, present].sum(1, keepdims=True)
    return float(_skm().roc_auc_score(y, sub, multi_class="ovr", labels=present))


def _ece(out, y):
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(torch.as_tensor(_probs(out)), torch.as_tensor(y),
                                              num_classes=out.shape[1], n_bins=15, norm="l1"))


def _point(out):
    """The point prediction: column 0 of (mean, sd) outputs (N, 2), else the (N,) or (N, 1) outputs."""
    return out[:, 0] if out.ndim == 2 and out.shape[1] == 2 else out.reshape(-1)


def _mae(out, y):
    return float(_skm().mean_absolute_error(y, _point(out)))


def _r2(out, y):
    return float(_skm().r2_score(y, _point(out)))


def _coverage90(out, y):
    """Fraction of targets inside the central 90% normal interval mean +- 1.6449 sd."""
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError(f"coverage90 needs outputs (N, 2) = (mean, standard deviation); got shape {out.shape}. "
                         "Have the model (or its forward) return both per sample")
    mean, sd, y = out[:, 0].astype(np.float64), out[:, 1].astype(np.float64), np.asarray(y, dtype=np.float64)
    if y.shape != mean.shape:
        raise ValueError(f"coverage90: {len(mean)} outputs but targets of shape {y.shape}; give one target per sample")
    if np.isnan(mean).any() or np.isnan(sd).any() or np.isnan(y).any():
        raise ValueError("coverage90: outputs or targets contain NaN; an interval with NaN covers nothing defined")
    if np.any(sd < 0):
        raise ValueError(f"coverage90: column 1 must be a standard deviation >= 0; got a minimum of {sd.min()}. "
                         "If the model gives a log-variance, return exp(0.5 * log_var)")
    return float(np.mean(np.abs(y - mean) <= _Z90 * sd))


def _dense_mean(name, rows, y):
    return float(case_values(name, rows).mean())


def _dense_metric(name: str) -> Metric | None:
    """The segmentation metric ``name`` (``dice``, ``dice:2``, ``hd95`` ...), or ``None``."""
    parsed = parse_dense_name(name)
    if parsed is None:
        return None
    overlap = parsed[0] in ("dice", "iou")
    return Metric(name, partial(_dense_mean, name), overlap, overlap, "segmentation")


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, True, True, "classification"),
    "balanced_accuracy": Metric("balanced_accuracy", _balanced_accuracy, True, True, "classification"),
    "macro_f1": Metric("macro_f1", _macro_f1, True, True, "classification"),
    "nll": Metric("nll", _nll, False, False, "classification"),
    "auroc": Metric("auroc", _auroc, True, True, "classification"),
    "ece": Metric("ece", _ece, False, True, "classification"),
    "mae": Metric("mae", _mae, False, False, "regression"),
    "r2": Metric("r2", _r2, True, False, "regression"),
    "coverage90": Metric("coverage90", _coverage90, True, True, "regression"),
    # Per case: the mean over foreground classes; then the mean over cases (evaluate.dense).
    "dice": _dense_metric("dice"),
    "iou": _dense_metric("iou"),
    "hd95": _dense_metric("hd95"),
    "asd": _dense_metric("asd"),
}


def register_metric(metric: Metric) -> None:
    """Add (or replace) a metric in the table; ``metric_value``, the matrix and ``summarize`` use it.

    Why: a study's own metric (a Brier score, a clinical cost) is then scored, summarized and
    bootstrapped like the built-in ones, without a second code path.

    Args:
        metric: the ``Metric`` to add; an entry of the same name is replaced.

    Returns:
        None.

    Raises:
        TypeError: ``metric`` is not a ``Metric``.

    Example:
        >>> def brier(out, y):
        ...     p = torch.softmax(torch.as_tensor(out), dim=1).numpy()
        ...     return float(((p - np.eye(out.shape[1])[y]) ** 2).sum(1).mean())
        >>> register_metric(Metric("brier", brier, False, False, "classification"))
        >>> metric_value("brier", np.zeros((2, 2)), np.array([0, 1]))
        0.5
        >>> del METRICS["brier"]  # leave the table as it was
    """
    if not isinstance(metric, Metric):
        raise TypeError(f"register_metric needs a Metric, got {type(metric).__name__}")
    METRICS[metric.name] = metric


def get_metric(name: str) -> Metric:
    """The table entry of ``name``.

    Why: callers read a metric's direction and task from one place; an unknown name fails here with
    the list of known ones instead of deep inside a scorer.

    Args:
        name: a metric name, e.g. ``"accuracy"``; a segmentation metric of one foreground class is
            ``<quantity>:<class>``, e.g. ``"dice:2"`` (built on demand, not stored in the table).

    Returns:
        The ``Metric`` registered under ``name``.

    Raises:
        ValueError: ``name`` is not in the table (the message lists the known names).

    Example:
        >>> m = get_metric("nll")
        >>> m.higher_is_better, m.bounded, m.task
        (False, False, 'classification')
        >>> get_metric("hd95:1").higher_is_better
        False
    """
    metric = _lookup(name)
    if metric is None:
        raise ValueError(f"unknown metric {name!r}; choose from {_known()}")
    return metric


def _lookup(name) -> Metric | None:
    if not isinstance(name, str):
        return None
    if name in METRICS:
        return METRICS[name]
    return _dense_metric(name) if ":" in name else None


def _known() -> str:
    return f"{tuple(METRICS)} or a segmentation metric of one class, e.g. 'dice:1'"


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Validate metric names; a single name is accepted.

    Why: the matrix checks its metrics before any statistics are collected, so a typo fails at once,
    not after the first pass over the data.

    Args:
        metrics: one metric name or a sequence of names.

    Returns:
        The names as a list (a single name becomes a one-element list).

    Raises:
        ValueError: a name is unknown, or no name is given (the message lists the known names).

    Example:
        >>> check_metrics("accuracy")
        ['accuracy']
        >>> check_metrics(["accuracy", "top-1"])
        Traceback (most recent call last):
        ...
        ValueError: unknown metric(s) ['top-1']; choose from (...) or a segmentation metric of one class, e.g. 'dice:1'
    """
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in names if _lookup(m) is None]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {bad}; choose from {_known()}")
    return names


def metric_value(name: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """One metric of model outputs against labels.

    Why: every score in a table goes through this one function, which checks that the metric fits
    the outputs (logits or one value per sample) and that the labels fit the number of classes.

    Args:
        name: a metric from the table. Classification (``outputs`` logits (N, K), ``y`` ints in
            [0, K)): ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``nll`` (log loss, nats),
            ``auroc`` (binary, or one-vs-rest macro), ``ece`` (expected calibration error, 15 bins,
            torchmetrics). Regression (``outputs`` (N,), (N, 1) or (N, 2) = (mean, standard
            deviation), ``y`` floats (N,)): ``mae``, ``r2`` (of the mean), ``coverage90`` (fraction
            of targets in mean +- 1.6449 sd, the central 90% normal interval; needs (N, 2)); (N, 2)
            outputs are read as (mean, sd) for a regression metric and as 2-class logits for a
            classification one. Segmentation (``outputs`` the (N, R) per-case rows of
            ``evaluate.dense.CaseScorer``, ``y`` only checked for length N): ``dice``, ``iou``
            (higher is better, in [0, 1]), ``hd95``, ``asd`` (physical units, lower is better), each
            per case the mean over foreground classes, then the mean over cases; ``dice:<c>``
            (``iou:<c>`` ...) for foreground class ``c`` alone. Empty masks score by the rules of
            ``evaluate.dense`` (both empty: perfect; one empty: dice 0, distances the image
            diagonal). Other metrics: ``register_metric``.
        outputs: the model's outputs, array-like (N, K), (N, 2), (N,) or per-case rows (N, R).
        y: the labels or targets, array-like (N,) (segmentation: any length-N sequence, or None).

    Returns:
        The metric as a float.

    Raises:
        ValueError: the metric is unknown, is for the other task than ``outputs``, or a label lies
            outside [0, K).

    Example:
        >>> logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
        >>> metric_value("accuracy", logits, np.array([0, 1, 1, 1]))
        0.75
        >>> metric_value("mae", np.array([1.0, 2.0]), np.array([1.5, 2.5]))
        0.5
        >>> metric_value("coverage90", np.array([[1.0, 1.0], [2.0, 0.1]]), np.array([2.0, 3.0]))
        0.5
    """
    metric = get_metric(name)
    if metric.task == "segmentation":
        return _segmentation_value(metric, outputs, y)
    outputs, y = np.asarray(outputs), np.asarray(y)
    regression = outputs.ndim == 1 or outputs.shape[1] == 1 or (metric.task == "regression" and outputs.shape[1] == 2)
    if regression and metric.task != "regression":
        raise ValueError(f"metric {name!r} needs class logits but the model outputs one value per sample; use one of "
                         f"{_names('regression')}")
    if not regression and metric.task != "classification":
        raise ValueError(f"metric {name!r} is for regression, which reads outputs (N,), (N, 1) or (N, 2) = (mean, "
                         f"sd); the model outputs class logits {outputs.shape}, use one of {_names('classification')}")
    if not regression:
        k = outputs.shape[1]
        y = y.astype(np.int64)
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels span [{y.min()}, {y.max()}] but the model has {k} outputs; check the label "
                             "encoding or num_classes")
    return metric.fn(outputs, y)


def _segmentation_value(metric: Metric, rows, y) -> float:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu()
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"metric {metric.name!r} takes the per-case rows (N, R) of evaluate.dense.CaseScorer, not "
                         f"outputs of shape {rows.shape}; score each batch with CaseScorer(num_classes)")
    if y is not None and (not hasattr(y, "__len__") or len(y) != len(rows)):
        raise ValueError(f"metric {metric.name!r}: {len(rows)} case rows but targets {y!r:.60}; give a length-"
                         f"{len(rows)} sequence (one per case) or None")
    return metric.fn(rows, y)


def _names(task: Task) -> tuple[str, ...]:
    return tuple(n for n, m in METRICS.items() if m.task == task)
