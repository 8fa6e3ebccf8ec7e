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

    ``outputs``: ``(strategy, source) -> (N, K)`` outputs in the order of ``labels[source]``.
    Rows: ``eval_source, strategy, baseline, metric, diff, ci_low, ci_high, n, level``.
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

    With ``baseline``, also the paired, stratified difference to it (``diff``, ``diff_low``,
    ``diff_high``). Rows: ``strategy, metric, value, ci_low, ci_high, n, n_sources, level`` (+ diff).
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
