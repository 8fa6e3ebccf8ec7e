"""Metrics (one table), the cross-source matrix (prepare -> collect -> score), summaries."""

from shiftbn.evaluate.compare import paired_table, pooled_table
from shiftbn.evaluate.dense import CaseScorer, case_values, dense_columns
from shiftbn.evaluate.matrix import MatrixPlan, collect, cross_source_matrix, prepare, score
from shiftbn.evaluate.metrics import METRICS, Metric, check_metrics, get_metric, metric_value, register_metric
from shiftbn.evaluate.summary import summarize
from shiftbn.evaluate.uncertainty import (
    Interval,
    bootstrap_interval,
    paired_difference,
    resample_indices,
    supports_difference,
)

__all__ = [
    "METRICS",
    "CaseScorer",
    "Interval",
    "MatrixPlan",
    "Metric",
    "bootstrap_interval",
    "case_values",
    "check_metrics",
    "collect",
    "cross_source_matrix",
    "dense_columns",
    "get_metric",
    "metric_value",
    "paired_difference",
    "paired_table",
    "pooled_table",
    "prepare",
    "register_metric",
    "resample_indices",
    "score",
    "summarize",
    "supports_difference",
]
