"""shiftbn: how BatchNorm networks trained on several sources behave under domain shift.

The public API; see README.md for a tour. Report figures live in ``shiftbn.report`` (imported on
demand, it loads matplotlib).
"""

from shiftbn.adapt import Strategy, parse_strategy, register_strategy
from shiftbn.bn import (
    BNLayer,
    BNStats,
    FrozenBN,
    Moments,
    SourceStats,
    bn_layers,
    buffer_stats,
    collect_stats,
    freeze_bn,
    load_stats,
    mix_stats,
    precise_bn,
    stats_shift,
    use_stats,
)
from shiftbn.data import LabShift, SourceTaggedDataset, Splits, load, simulate_labs
from shiftbn.evaluate import cross_source_matrix, evaluate, metric_value, summarize
from shiftbn.protocols import (
    batch_composition,
    ema_vs_precise,
    held_out_sources,
    leakage_probe,
    load_spec,
    normalization_batch_size,
    run_spec,
    run_study,
    shared_domains,
)
from shiftbn.runs import RunFolder
from shiftbn.samplers import EpochBatches, SourceBatchSampler
from shiftbn.train import train

__version__ = "0.1.0"

__all__ = [
    "BNLayer",
    "BNStats",
    "EpochBatches",
    "FrozenBN",
    "LabShift",
    "Moments",
    "RunFolder",
    "SourceBatchSampler",
    "SourceStats",
    "SourceTaggedDataset",
    "Splits",
    "Strategy",
    "batch_composition",
    "bn_layers",
    "buffer_stats",
    "collect_stats",
    "cross_source_matrix",
    "ema_vs_precise",
    "evaluate",
    "freeze_bn",
    "held_out_sources",
    "leakage_probe",
    "load",
    "load_spec",
    "load_stats",
    "metric_value",
    "mix_stats",
    "normalization_batch_size",
    "parse_strategy",
    "precise_bn",
    "register_strategy",
    "run_spec",
    "run_study",
    "shared_domains",
    "simulate_labs",
    "stats_shift",
    "summarize",
    "train",
    "use_stats",
]
