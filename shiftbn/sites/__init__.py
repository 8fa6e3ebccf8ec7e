"""Decisions per site: per-site routed models, statistics files, recalibration and monitoring.

The wing for an engineer deploying one model to many hospitals: statistics computed where the
data lives (files with an exact merge, tied to the model by a fingerprint), a model that routes
each sample to its site's statistics, ``recalibrate`` for one site, the drift monitor with ATC,
the label-free strategy chooser and the batch-composition audit.
"""

from shiftbn.sites.atc import ATC, fit_atc
from shiftbn.sites.audit import BatchAudit, audit_batches, audit_samplers, builtin_samplers
from shiftbn.sites.choose import choose_strategy
from shiftbn.sites.drift import DriftMonitor, DriftResult, rank_sites
from shiftbn.sites.files import StatsHeader, merge_stats, read_stats, read_stats_header, save_stats
from shiftbn.sites.fingerprint import model_fingerprint
from shiftbn.sites.recalibration import RecalibrationMethod, recalibrate
from shiftbn.sites.routed import PerSiteModel, RoutedBN, per_site_model

__all__ = [
    "ATC",
    "BatchAudit",
    "DriftMonitor",
    "DriftResult",
    "PerSiteModel",
    "RecalibrationMethod",
    "RoutedBN",
    "StatsHeader",
    "audit_batches",
    "audit_samplers",
    "builtin_samplers",
    "choose_strategy",
    "fit_atc",
    "merge_stats",
    "model_fingerprint",
    "per_site_model",
    "rank_sites",
    "read_stats",
    "read_stats_header",
    "recalibrate",
    "save_stats",
]
