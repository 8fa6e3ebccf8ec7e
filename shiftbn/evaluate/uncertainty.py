"""Bootstrap intervals for one metric and paired intervals for the difference of two strategies.

Why: a matrix cell or a strategy ranking is only a finding when it is bigger than the sampling
noise of the evaluation samples. Resampling is stratified by source when ``strata`` is given (each
source keeps its size), and a paired comparison resamples the same samples for both strategies, so
noise that both share cancels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from shiftbn.evaluate.dense import case_values
from shiftbn.evaluate.metrics import get_metric, metric_value

_ECE_BINS = 15


class Interval(NamedTuple):
    """A point estimate and its percentile bootstrap interval.

    Why: a value and its interval travel together (and unpack as a tuple), so a report never prints
    a rate without its noise.

    Args:
        value: the metric (or difference) on all samples.
        low: the interval's lower end (NaN when no resample gave a finite value).
        high: the interval's upper end (NaN likewise).

    Returns:
        An ``Interval``, a named tuple ``(value, low, high)``.

    Example:
        >>> iv = Interval(0.8, 0.7, 0.9)
        >>> iv.high - iv.low > 0, tuple(iv) == (0.8, 0.7, 0.9)
        (True, True)
    """

    value: float
    low: float
    high: float


def resample_indices(n: int, n_boot: int, seed: int = 0, strata: np.ndarray | None = None) -> np.ndarray:
    """``(n_boot, n)`` bootstrap indices; with ``strata`` (one label per sample) each resample draws,
    within every stratum, as many samples as it holds (sorted by stratum, then by draw).

    Why: one documented rule, so an interval can be reproduced by hand: drawn as
    ``np.random.default_rng(seed).integers(0, m, size=(n_boot, m))`` per stratum of ``m`` samples,
    strata in the order of ``np.unique(strata)``.

    Args:
        n: number of samples.
        n_boot: number of resamples.
        seed: seed of the generator.
        strata: optional (n,) array, the stratum (e.g. source) of each sample.

    Returns:
        An int64 array (n_boot, n) of sample positions, one resample per row.

    Raises:
        ValueError: ``strata`` does not hold one entry per sample.

    Example:
        >>> resample_indices(4, 2, seed=0).tolist()
        [[3, 2, 2, 1], [1, 0, 0, 0]]
        >>> resample_indices(4, 2, seed=0, strata=np.array(["a", "a", "b", "b"])).tolist()  # a: 0-1, b: 2-3
        [[1, 1, 2, 2], [1, 0, 2, 2]]
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    strata = np.asarray(strata)
    if len(strata) != n:
        raise ValueError(f"strata has {len(strata)} entries for {n} samples; give one stratum per sample")
    parts = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        parts.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(parts, axis=1)


def _check(outputs: np.ndarray, y: np.ndarray, n_boot: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    outputs, y = np.asarray(outputs), np.asarray(y)
    if len(outputs) != len(y) or not len(y):
        raise ValueError(f"need as many outputs as labels, at least one; got {len(outputs)} and {len(y)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    if int(n_boot) < 10:
        raise ValueError(f"n_boot must be at least 10 resamples; got {n_boot!r}")
    return outputs, y


def _per_sample(name: str, outputs: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Per-sample terms whose weighted mean is the metric (accuracy, nll, segmentation's per-case values), or
    ``None``."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return None
    if get_metric(name).task == "segmentation":
        return case_values(name, outputs)
    if name == "accuracy":
        return (outputs.argmax(1) == y).astype(np.float64)
    if name == "nll":
        logp = torch.log_softmax(torch.as_tensor(outputs, dtype=torch.float64), dim=1).numpy()
        return -logp[np.arange(len(y)), y.astype(np.int64)]
    return None


def _ece_terms(outputs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample bin id and confidence-minus-correct: ECE = sum_b |sum_{i in b} d_i| / n."""
    p = torch.softmax(torch.as_tensor(outputs, dtype=torch.float64), dim=1).numpy()
    conf = p.max(1)
    bins = np.clip(np.ceil(conf * _ECE_BINS).astype(np.int64) - 1, 0, _ECE_BINS - 1)
    return bins, conf - (p.argmax(1) == y)


def _replicates(name: str, outputs: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric on every resample (rows of ``idx``)."""
    terms = _per_sample(name, outputs, y)
    if terms is not None:
        return terms[idx].mean(axis=1)
    if name == "ece" and outputs.ndim == 2 and outputs.shape[1] >= 2:
        bins, d = _ece_terms(outputs, y)
        flat = (bins[idx] + _ECE_BINS * np.arange(len(idx))[:, None]).ravel()
        sums = np.bincount(flat, weights=d[idx].ravel(), minlength=len(idx) * _ECE_BINS)
        return np.abs(sums.reshape(len(idx), _ECE_BINS)).sum(axis=1) / idx.shape[1]
    return np.array([metric_value(name, outputs[i], y[i]) for i in idx])


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return float("nan"), float("nan")
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(outputs: np.ndarray, y: np.ndarray, metric: str = "accuracy", *, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0, strata: np.ndarray | None = None) -> Interval:
    """The metric of ``outputs`` against ``y`` with a percentile bootstrap interval.

    Why: every rate in a report needs its sampling noise next to it.

    Args:
        outputs: logits (N, K) or regression outputs (N,).
        y: (N,) labels or targets.
        metric: a name from the metric table (``METRICS``).
        n_boot: number of resamples (at least 10).
        level: the interval's coverage in (0, 1), e.g. 0.95.
        seed: seed of the resampling (``resample_indices``).
        strata: optional (N,) source of each sample, so a pooled number is resampled within each
            source.

    Returns:
        ``Interval(value, low, high)``: the metric on all samples and the percentile interval of its
        resamples.

    Raises:
        ValueError: ``outputs`` and ``y`` differ in length or are empty, ``level`` is outside (0, 1),
            or ``n_boot`` is below 10.

    Example:
        >>> y = np.arange(40) % 2
        >>> outputs = np.eye(2)[np.where(np.arange(40) % 5 == 0, 1 - y, y)]  # every 5th sample wrong
        >>> iv = bootstrap_interval(outputs, y, "accuracy", n_boot=200)
        >>> round(iv.value, 2), iv.low < iv.value < iv.high
        (0.8, True)
    """
    outputs, y = _check(outputs, y, n_boot, level)
    idx = resample_indices(len(y), int(n_boot), seed, strata)
    return Interval(metric_value(metric, outputs, y), *_percentiles(_replicates(metric, outputs, y, idx), level))


def paired_difference(outputs_a: np.ndarray, outputs_b: np.ndarray, y: np.ndarray, metric: str = "accuracy", *,
                      n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                      strata: np.ndarray | None = None) -> Interval:
    """metric(A) - metric(B) on the same samples, with a paired percentile bootstrap interval.

    Why: two strategies scored on one site share its samples; resampling the same indices for both
    cancels the shared noise, so the interval of the difference is narrower than one built from two
    independent intervals.

    Args:
        outputs_a: (N, K) logits (or (N,)) of strategy A.
        outputs_b: the outputs of strategy B for the same samples in the same order, same shape.
        y: (N,) labels or targets.
        metric: a name from the metric table (``METRICS``).
        n_boot: number of resamples (at least 10).
        level: the interval's coverage in (0, 1).
        seed: seed of the resampling (``resample_indices``).
        strata: optional (N,) source of each sample (resampled within source).

    Returns:
        ``Interval(diff, low, high)``; an interval that contains 0 does not support a difference
        (``supports_difference``).

    Raises:
        ValueError: as ``bootstrap_interval``, or the two outputs differ in shape.

    Example:
        >>> y = np.arange(40) % 2
        >>> a = np.eye(2)[np.where(np.arange(40) % 5 == 0, 1 - y, y)]  # 80% right
        >>> b = np.eye(2)[np.where(np.arange(40) % 2 == 0, 1 - y, y)]  # 50% right
        >>> d = paired_difference(a, b, y, "accuracy", n_boot=200)
        >>> round(d.value, 2), supports_difference(d.low, d.high)
        (0.3, True)
    """
    outputs_a, y = _check(outputs_a, y, n_boot, level)
    outputs_b = np.asarray(outputs_b)
    if outputs_b.shape != outputs_a.shape:
        raise ValueError(f"outputs_a {outputs_a.shape} and outputs_b {outputs_b.shape} must hold the same samples")
    idx = resample_indices(len(y), int(n_boot), seed, strata)
    reps = _replicates(metric, outputs_a, y, idx) - _replicates(metric, outputs_b, y, idx)
    diff = metric_value(metric, outputs_a, y) - metric_value(metric, outputs_b, y)
    return Interval(diff, *_percentiles(reps, level))


def supports_difference(low: float, high: float) -> bool:
    """Whether an interval of a difference excludes 0 (both ends finite and of one sign).

    Why: the one rule by which a report calls one strategy better than another; NaN ends (no finite
    resample) never support a difference.

    Args:
        low: the interval's lower end.
        high: the interval's upper end.

    Returns:
        True when both ends are finite and of one sign (0 excluded).

    Example:
        >>> supports_difference(0.02, 0.10), supports_difference(-0.01, 0.10), supports_difference(float("nan"), 0.1)
        (True, False, False)
    """
    return bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))
