"""Per-strategy summaries of a matrix table: mean, worst and best source (WILDS-style)."""

from __future__ import annotations

import pandas as pd

from shiftbn.evaluate.metrics import get_metric


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and metric: mean over eval sources, the worst source and its value, the best, and
    the best-worst gap.

    Why: a strategy that rescues the average but fails one site is a finding (WILDS reports the
    worst group); "worst" follows each metric's direction in the metric table.

    Args:
        table: a matrix table (``cross_source_matrix``), at least the columns ``strategy, metric,
            eval_source, value``.

    Returns:
        Tidy DataFrame, one row per (strategy, metric): ``strategy, metric, mean, worst_source,
        worst, best_source, best, gap, n_sources``.

    Raises:
        ValueError: a metric in ``table`` is not in the metric table.

    Example:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"strategy": "target", "eval_source": ["lab_0", "lab_1"], "metric": "accuracy",
        ...                       "value": [0.9, 0.7]})
        >>> summary = summarize(table)[["strategy", "mean", "worst_source", "worst", "gap"]].round(2)
        >>> print(summary.to_string(index=False))
        strategy  mean worst_source  worst  gap
          target   0.8        lab_1    0.7  0.2
    """
    rows = []
    for (strategy, metric), g in table.groupby(["strategy", "metric"], sort=False):
        ordered = g.sort_values("value", ascending=get_metric(metric).higher_is_better)
        worst, best = ordered.iloc[0], ordered.iloc[-1]
        rows.append({"strategy": strategy, "metric": metric, "mean": g["value"].mean(),
                     "worst_source": worst["eval_source"], "worst": worst["value"],
                     "best_source": best["eval_source"], "best": best["value"],
                     "gap": abs(best["value"] - worst["value"]), "n_sources": len(g)})
    return pd.DataFrame(rows)


def interval_cells(table: pd.DataFrame, index: str, columns: str, *, digits: int = 3) -> pd.DataFrame:
    """A pivot of ``value`` with each cell as ``value [low, high]`` (when present) and ``n`` in the column names.

    Why: ``shiftbn matrix`` prints it; it lives here, beside the tables it shows, so that the command does
    not import the report (matplotlib and seaborn: about a second of start-up).
    """
    fmt = f"{{:.{digits}f}}"
    t = table.copy()
    t["cell"] = t["value"].map(fmt.format)
    if {"ci_low", "ci_high"} <= set(t.columns):
        t["cell"] += " [" + t["ci_low"].map(fmt.format) + ", " + t["ci_high"].map(fmt.format) + "]"
    grid = t.pivot_table(index=index, columns=columns, values="cell", aggfunc="first", sort=False)
    ns = t.groupby(columns, sort=False)["n"].first()
    grid.columns = [f"{c} (n={int(ns[c])})" for c in grid.columns]
    grid.columns.name = None
    return grid.reset_index()
