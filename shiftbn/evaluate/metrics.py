"""The metric table: name -> function, direction, bounds, task. Everything that scores reads it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Metric:
    """One metric: ``fn(outputs, y) -> float``; whether higher is better; whether it lies in [0, 1].

    Classification metrics get logits (N, K) and int labels in [0, K); regression metrics get
    outputs (N,) and float targets.
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
    return float(_skm().accuracy_score(y, out.argmax(1)))


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


def _mae(out, y):
    return float(_skm().mean_absolute_error(y, out.reshape(-1)))


def _r2(out, y):
    return float(_skm().r2_score(y, out.reshape(-1)))


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, True, True, "classification"),
    "balanced_accuracy": Metric("balanced_accuracy", _balanced_accuracy, True, True, "classification"),
    "macro_f1": Metric("macro_f1", _macro_f1, True, True, "classification"),
    "nll": Metric("nll", _nll, False, False, "classification"),
    "auroc": Metric("auroc", _auroc, True, True, "classification"),
    "ece": Metric("ece", _ece, False, True, "classification"),
    "mae": Metric("mae", _mae, False, False, "regression"),
    "r2": Metric("r2", _r2, True, False, "regression"),
}


def register_metric(metric: Metric) -> None:
    """Add (or replace) a metric in the table; ``metric_value``, the matrix and ``summarize`` use it."""
    if not isinstance(metric, Metric):
        raise TypeError(f"register_metric needs a Metric, got {type(metric).__name__}")
    METRICS[metric.name] = metric


def get_metric(name: str) -> Metric:
    """The table entry of ``name`` (ValueError listing the known names otherwise)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {tuple(METRICS)}")
    return METRICS[name]


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Validate metric names; a single name is accepted."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {bad}; choose from {tuple(METRICS)}")
    return names


def metric_value(name: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """One metric of model outputs against labels.

    Classification: ``outputs`` are logits (N, K), ``y`` ints in [0, K): ``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``nll`` (log loss, nats), ``auroc`` (binary, or one-vs-rest
    macro), ``ece`` (expected calibration error, 15 bins, torchmetrics). Regression: ``outputs`` (N,)
    or (N, 1): ``mae``, ``r2``. Other metrics: ``register_metric``.
    """
    metric = get_metric(name)
    outputs, y = np.asarray(outputs), np.asarray(y)
    regression = outputs.ndim == 1 or outputs.shape[1] == 1
    if regression and metric.task != "regression":
        raise ValueError(f"metric {name!r} needs class logits but the model outputs one value per sample; use one of "
                         f"{_names('regression')}")
    if not regression and metric.task != "classification":
        raise ValueError(f"metric {name!r} is for regression; the model outputs class logits, use one of "
                         f"{_names('classification')}")
    if not regression:
        k = outputs.shape[1]
        y = y.astype(np.int64)
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels span [{y.min()}, {y.max()}] but the model has {k} outputs; check the label "
                             "encoding or num_classes")
    return metric.fn(outputs, y)


def _names(task: Task) -> tuple[str, ...]:
    return tuple(n for n, m in METRICS.items() if m.task == task)
