"""Metrics (one table), the cross-source matrix (prepare -> collect -> score) and summaries."""

from shiftbn.evaluate.matrix import MatrixPlan, collect, cross_source_matrix, evaluate, prepare, score
from shiftbn.evaluate.metrics import METRICS, Metric, check_metrics, get_metric, metric_value, register_metric
from shiftbn.evaluate.summary import summarize

__all__ = [
    "METRICS",
    "MatrixPlan",
    "Metric",
    "check_metrics",
    "collect",
    "cross_source_matrix",
    "evaluate",
    "get_metric",
    "metric_value",
    "prepare",
    "register_metric",
    "score",
    "summarize",
]
