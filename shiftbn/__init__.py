"""shiftbn: how BatchNorm networks trained on several sources behave under domain shift.

The public API; see README.md for a tour. Report figures live in ``shiftbn.report`` (imported on
demand, it loads matplotlib).

Names are imported on first use (PEP 562): ``import shiftbn`` (and so ``shiftbn --help``) loads
no torch, pandas or matplotlib until a name from ``__all__`` is touched.
"""

from __future__ import annotations

import importlib
import sys
import types

from shiftbn._version import __version__ as __version__

# Where each public name lives; ``__getattr__`` imports the module on first access.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "shiftbn.adapt": ("AdaptContext", "BatchStats", "PerSource", "Precise", "Prior", "Source", "StatsFrom",
                      "StatsFromEach", "Strategy", "Target", "Tent", "TentOffline", "parse_strategy", "recalibrate",
                      "register_strategy"),
    "shiftbn.bn": ("BNLayer", "BNStats", "FrozenBN", "Moments", "PerSiteModel", "PopulationStats", "SourceStats",
                   "StatsHeader", "bn_layers", "buffer_stats", "collect_stats", "freeze_bn", "load_stats",
                   "merge_stats", "mix_stats", "model_fingerprint", "model_lock", "per_site_model", "precise_bn",
                   "read_stats", "read_stats_header", "save_stats", "stats_shift", "use_stats"),
    "shiftbn.data": ("Corruption", "ItemKeys", "LabShift", "SourceTaggedDataset", "Splits", "load", "simulate_labs"),
    "shiftbn.evaluate": ("METRICS", "BatchAudit", "DriftMonitor", "Metric", "audit_batches", "audit_samplers",
                         "bootstrap_interval", "choose_strategy", "cross_source_matrix", "evaluate", "metric_value",
                         "paired_difference", "register_metric", "summarize"),
    "shiftbn.protocols": ("STUDIES", "BagLeakage", "BatchComposition", "DriftDetection", "EmaVsPrecise",
                          "HeldOutSources", "LeakageProbe", "NormalizationBatchSize", "SharedDomains", "StrategyChoice",
                          "Study", "TrainConfig", "bag_leakage", "batch_composition", "drift_detection",
                          "ema_vs_precise", "held_out_sources", "leakage_probe", "load_spec",
                          "normalization_batch_size", "run_spec", "shared_domains", "strategy_choice"),
    "shiftbn.runner": ("run_study",),
    "shiftbn.runs": ("RunFolder",),
    "shiftbn.samplers": ("EpochBatches", "SourceBatchSampler"),
    "shiftbn.train": ("train",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
# Subpackages reachable as attributes (``sb.bn.buffer_stats``), as after the former eager imports.
_SUBMODULES = frozenset({"adapt", "bn", "data", "protocols", "report", "runs", "runner", "samplers", "models", "demo",
                         "cli", "integrations"})
# Submodules named like the function they export: ``sb.train``/``sb.evaluate`` stay the functions.
_SHADOWED = frozenset({"train", "evaluate"})


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module, keeping ``shiftbn.train``/``shiftbn.evaluate`` the functions.

    Why: importing the submodule ``shiftbn.train`` makes the import system set the package's
    ``train`` attribute to the module; with eager imports the function was bound afterwards and won.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "METRICS",
    "STUDIES",
    "AdaptContext",
    "BNLayer",
    "BNStats",
    "BagLeakage",
    "BatchAudit",
    "BatchComposition",
    "BatchStats",
    "Corruption",
    "DriftDetection",
    "DriftMonitor",
    "EmaVsPrecise",
    "EpochBatches",
    "FrozenBN",
    "HeldOutSources",
    "ItemKeys",
    "LabShift",
    "LeakageProbe",
    "Metric",
    "Moments",
    "NormalizationBatchSize",
    "PerSiteModel",
    "PerSource",
    "PopulationStats",
    "Precise",
    "Prior",
    "RunFolder",
    "SharedDomains",
    "Source",
    "SourceBatchSampler",
    "SourceStats",
    "SourceTaggedDataset",
    "Splits",
    "StatsFrom",
    "StatsFromEach",
    "StatsHeader",
    "Strategy",
    "StrategyChoice",
    "Study",
    "Target",
    "Tent",
    "TentOffline",
    "TrainConfig",
    "audit_batches",
    "audit_samplers",
    "bag_leakage",
    "batch_composition",
    "bn_layers",
    "bootstrap_interval",
    "buffer_stats",
    "choose_strategy",
    "collect_stats",
    "cross_source_matrix",
    "drift_detection",
    "ema_vs_precise",
    "evaluate",
    "freeze_bn",
    "held_out_sources",
    "leakage_probe",
    "load",
    "load_spec",
    "load_stats",
    "merge_stats",
    "metric_value",
    "mix_stats",
    "model_fingerprint",
    "model_lock",
    "normalization_batch_size",
    "paired_difference",
    "parse_strategy",
    "per_site_model",
    "precise_bn",
    "read_stats",
    "read_stats_header",
    "recalibrate",
    "register_metric",
    "register_strategy",
    "run_spec",
    "run_study",
    "save_stats",
    "shared_domains",
    "simulate_labs",
    "stats_shift",
    "strategy_choice",
    "summarize",
    "train",
    "use_stats",
]
