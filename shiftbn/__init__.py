"""shiftbn: how BatchNorm networks trained on several sources behave under domain shift.

The top level is the core a researcher imports: source-tagged data, the sampler, the statistics
engine, strategies and the cross-source matrix with its metrics. The wings are sub-packages:
``shiftbn.sites`` (per-site models, statistics files, recalibration, monitoring),
``shiftbn.studies`` (the paper's protocols, training, the report, the demo),
``shiftbn.integrations`` (Lightning and plain training loops) and ``shiftbn.cli``.

Names are imported on first use (PEP 562): ``import shiftbn`` (and so ``shiftbn --help``) loads
no torch, pandas or matplotlib until a name is touched.

Example:
    >>> import shiftbn as sb
    >>> ds = sb.load("blobs-labs", n=120)
    >>> sorted(ds.sources_present)[:2]
    ['lab_0', 'lab_1']
"""

from __future__ import annotations

import importlib
import warnings

from shiftbn._version import __version__ as __version__

# Where each public name lives; ``__getattr__`` imports the module on first access.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "shiftbn.data": ("ItemKeys", "SourceTaggedDataset", "Splits", "load", "simulate_labs"),
    "shiftbn.samplers": ("SourceBatchSampler",),
    "shiftbn.bn": ("BNStats", "CollectOptions", "PopulationStats", "SourceStats", "bn_layers", "buffer_stats",
                   "collect_stats", "freeze_bn", "load_stats", "mix_stats", "precise_bn", "stats_shift", "use_stats"),
    "shiftbn.adapt": ("Strategy", "parse_strategy", "register_strategy"),
    "shiftbn.evaluate": ("METRICS", "Metric", "bootstrap_interval", "cross_source_matrix", "metric_value",
                         "paired_difference", "register_metric", "summarize"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = frozenset({"adapt", "bn", "cli", "data", "evaluate", "integrations", "samplers", "sites", "studies"})

# Names the top level exported before the wings existed; they keep working for one release with a
# DeprecationWarning that names their new home.
_MOVED: dict[str, str] = {
    **dict.fromkeys(("AdaptContext", "BatchStats", "PerSource", "Precise", "Prior", "Source", "StatsFrom",
                     "StatsFromEach", "Target", "Tent", "TentOffline"), "shiftbn.adapt"),
    **dict.fromkeys(("BNLayer", "FrozenBN", "Moments", "model_lock"), "shiftbn.bn"),
    **dict.fromkeys(("Corruption", "LabShift"), "shiftbn.data"),
    "EpochBatches": "shiftbn.samplers",
    **dict.fromkeys(("BatchAudit", "DriftMonitor", "PerSiteModel", "StatsHeader", "audit_batches", "audit_samplers",
                     "choose_strategy", "merge_stats", "model_fingerprint", "per_site_model", "read_stats",
                     "read_stats_header", "recalibrate", "save_stats"), "shiftbn.sites"),
    **dict.fromkeys(("STUDIES", "BagLeakage", "BatchComposition", "DriftDetection", "EmaVsPrecise",
                     "HeldOutSources", "LeakageProbe", "NormalizationBatchSize", "RunFolder", "SharedDomains",
                     "StrategyChoice", "Study", "TrainConfig", "load_spec", "run_spec", "run_study", "train"),
                    "shiftbn.studies"),
}
_NEW_NAME = {"Source": "EMA"}  # moved and renamed: the strategy 'source' is now 'ema'

# Sub-modules reachable as ``sb.<name>`` before the wings existed, kept for one release.
_MOVED_MODULES = {"models": "shiftbn.studies.models", "protocols": "shiftbn.studies",
                  "report": "shiftbn.studies.report", "runs": "shiftbn.studies.runs",
                  "runner": "shiftbn.studies.runner", "demo": "shiftbn.studies.demo"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _MOVED:
        home, new = _MOVED[name], _NEW_NAME.get(name, name)
        warnings.warn(f"shiftbn.{name} moved to {home}.{new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), new)
    elif name in _MOVED_MODULES:
        warnings.warn(f"shiftbn.{name} moved to {_MOVED_MODULES[name]}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED_MODULES[name])
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBPACKAGES)


__all__ = sorted(_WHERE)
