"""Metrics (one table), the cross-source matrix (prepare -> collect -> score), summaries and the batch audit."""

from shiftbn.evaluate.atc import ATC, fit_atc
from shiftbn.evaluate.audit import BatchAudit, audit_batches, audit_samplers, builtin_samplers
from shiftbn.evaluate.choose import choose_strategy
from shiftbn.evaluate.compare import paired_table, pooled_table
from shiftbn.evaluate.drift import DriftMonitor, DriftResult
from shiftbn.evaluate.matrix import MatrixPlan, collect, cross_source_matrix, evaluate, prepare, score
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
    "ATC",
    "METRICS",
    "BatchAudit",
    "DriftMonitor",
    "DriftResult",
    "Interval",
    "MatrixPlan",
    "Metric",
    "audit_batches",
    "audit_samplers",
    "bootstrap_interval",
    "builtin_samplers",
    "check_metrics",
    "choose_strategy",
    "collect",
    "cross_source_matrix",
    "evaluate",
    "fit_atc",
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
