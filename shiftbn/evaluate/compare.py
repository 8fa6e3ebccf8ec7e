"""Tidy tables of paired strategy comparisons per source and of stratified pooled metrics.

Why: a report may only rank strategies where the sampling noise allows it; these tables hold the
intervals the findings read. Inputs are the outputs kept by ``score(keep_outputs=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from shiftbn.evaluate.uncertainty import bootstrap_interval, paired_difference

Outputs = dict[tuple[str, str], np.ndarray]


def paired_table(outputs: Outputs, labels: dict[str, np.ndarray], strategies: Sequence[str], sources: Sequence[str],
                 *, baseline: str = "ema", metric: str = "accuracy", n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> pd.DataFrame:
    """Every strategy minus ``baseline`` on every source, with paired bootstrap intervals.

    Why: whether a strategy beats the baseline on a site is read from the paired interval of the
    difference (``paired_difference``), not from two overlapping intervals.

    Args:
        outputs: ``(strategy, source) -> (N, K)`` outputs in the order of ``labels[source]`` (as
            ``score(keep_outputs=...)`` fills it); cells missing for a strategy or the baseline are
            skipped.
        labels: source -> (N,) labels.
        strategies: the strategy names to compare (``baseline`` itself is skipped).
        sources: the eval sources, one block of rows each.
        baseline: the strategy subtracted.
        metric: a name from the metric table.
        n_boot: number of resamples.
        level: the intervals' coverage in (0, 1).
        seed: seed of the resampling.

    Returns:
        Tidy DataFrame, one row per (source, strategy): ``eval_source, strategy, baseline, metric,
        diff, ci_low, ci_high, n, level`` (no rows, same columns, when nothing pairs).

    Example:
        >>> y = np.arange(20) % 2
        >>> right, wrong_4th = np.eye(2)[y], np.eye(2)[np.where(np.arange(20) % 4 == 0, 1 - y, y)]
        >>> outputs = {("target", "lab_0"): right, ("target", "lab_1"): wrong_4th,
        ...            ("precise", "lab_0"): wrong_4th, ("precise", "lab_1"): wrong_4th}
        >>> labels = {"lab_0": y, "lab_1": y}
        >>> t = paired_table(outputs, labels, ["target", "precise"], ["lab_0", "lab_1"], baseline="precise",
        ...                  n_boot=100)
        >>> print(t[["eval_source", "strategy", "diff"]].to_string(index=False))
        eval_source strategy  diff
              lab_0   target  0.25
              lab_1   target  0.00
    """
    rows = []
    for src in sources:
        y = labels[src]
        for st in strategies:
            if st == baseline or (st, src) not in outputs or (baseline, src) not in outputs:
                continue
            d = paired_difference(outputs[(st, src)], outputs[(baseline, src)], y, metric, n_boot=n_boot,
                                  level=level, seed=seed)
            rows.append({"eval_source": src, "strategy": st, "baseline": baseline, "metric": metric, "diff": d.value,
                         "ci_low": d.low, "ci_high": d.high, "n": len(y), "level": level})
    return pd.DataFrame(rows, columns=["eval_source", "strategy", "baseline", "metric", "diff", "ci_low", "ci_high",
                                       "n", "level"])


def pooled_table(outputs: Outputs, labels: dict[str, np.ndarray], strategies: Sequence[str], sources: Sequence[str],
                 *, baseline: str | None = "ema", metric: str = "accuracy", n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each strategy's metric over all ``sources`` pooled, resampled within each source (stratified).

    Why: a ranking over all sites needs one number per strategy whose interval keeps every site's
    size fixed, so a large site cannot be resampled away.

    Args:
        outputs: ``(strategy, source) -> (N, K)`` outputs in the order of ``labels[source]``; only
            the sources where every strategy has outputs are pooled.
        labels: source -> (N,) labels.
        strategies: the strategy names, one row each.
        sources: the sources to pool.
        baseline: with a name, also the paired, stratified difference to that strategy (``diff``,
            ``diff_low``, ``diff_high``); ``None``: no difference columns.
        metric: a name from the metric table.
        n_boot: number of resamples.
        level: the intervals' coverage in (0, 1).
        seed: seed of the resampling.

    Returns:
        Tidy DataFrame, one row per strategy: ``strategy, metric, value, ci_low, ci_high, n,
        n_sources, level`` (+ the difference columns); no rows when no source has every strategy.

    Example:
        >>> y = np.arange(20) % 2
        >>> right, wrong_4th = np.eye(2)[y], np.eye(2)[np.where(np.arange(20) % 4 == 0, 1 - y, y)]
        >>> outputs = {("target", "lab_0"): right, ("target", "lab_1"): wrong_4th,
        ...            ("precise", "lab_0"): wrong_4th, ("precise", "lab_1"): wrong_4th}
        >>> labels = {"lab_0": y, "lab_1": y}
        >>> t = pooled_table(outputs, labels, ["target", "precise"], ["lab_0", "lab_1"], baseline="precise",
        ...                  n_boot=100)
        >>> print(t[["strategy", "value", "n", "n_sources", "diff"]].to_string(index=False))
        strategy  value  n  n_sources  diff
          target  0.875 40          2 0.125
         precise  0.750 40          2 0.000
    """
    srcs = [s for s in sources if all((st, s) in outputs for st in strategies)]
    if not srcs:
        return pd.DataFrame(columns=["strategy", "metric", "value", "ci_low", "ci_high", "n", "n_sources", "level"])
    y = np.concatenate([labels[s] for s in srcs])
    strata = np.concatenate([np.full(len(labels[s]), i) for i, s in enumerate(srcs)])
    stacked = {st: np.concatenate([outputs[(st, s)] for s in srcs]) for st in strategies}
    rows = []
    for st in strategies:
        iv = bootstrap_interval(stacked[st], y, metric, n_boot=n_boot, level=level, seed=seed, strata=strata)
        row = {"strategy": st, "metric": metric, "value": iv.value, "ci_low": iv.low, "ci_high": iv.high,
               "n": len(y), "n_sources": len(srcs), "level": level}
        if baseline is not None and baseline in stacked:
            d = paired_difference(stacked[st], stacked[baseline], y, metric, n_boot=n_boot, level=level, seed=seed,
                                  strata=strata)
            row.update(diff=d.value, diff_low=d.low, diff_high=d.high)
        rows.append(row)
    return pd.DataFrame(rows)
