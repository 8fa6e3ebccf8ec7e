"""Per-strategy summaries of a matrix table: mean, worst and best source (WILDS-style)."""

from __future__ import annotations

import pandas as pd

from shiftbn.evaluate.metrics import get_metric


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and metric: mean over eval sources, the worst source and its value, the best, and
    the best-worst gap. "Worst" follows each metric's direction in the metric table."""
    rows = []
    for (strategy, metric), g in table.groupby(["strategy", "metric"], sort=False):
        ordered = g.sort_values("value", ascending=get_metric(metric).higher_is_better)
        worst, best = ordered.iloc[0], ordered.iloc[-1]
        rows.append({"strategy": strategy, "metric": metric, "mean": g["value"].mean(),
                     "worst_source": worst["eval_source"], "worst": worst["value"],
                     "best_source": best["eval_source"], "best": best["value"],
                     "gap": abs(best["value"] - worst["value"]), "n_sources": len(g)})
    return pd.DataFrame(rows)
