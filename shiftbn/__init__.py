"""shiftbn: how BatchNorm networks trained on several sources behave under domain shift."""

from shiftbn.bn import (
    BNLayer,
    BNStats,
    FrozenBN,
    Moments,
    SourceStats,
    bn_layers,
    collect_stats,
    freeze_bn,
    load_stats,
    precise_bn,
    stats_shift,
    use_stats,
)
from shiftbn.data import LabShift, SourceTaggedDataset, Splits, load, simulate_labs
from shiftbn.samplers import EpochBatches, SourceBatchSampler

__version__ = "0.1.0"

__all__ = [
    "BNLayer",
    "BNStats",
    "EpochBatches",
    "FrozenBN",
    "LabShift",
    "Moments",
    "SourceBatchSampler",
    "SourceStats",
    "SourceTaggedDataset",
    "Splits",
    "bn_layers",
    "collect_stats",
    "freeze_bn",
    "load",
    "load_stats",
    "precise_bn",
    "simulate_labs",
    "stats_shift",
    "use_stats",
]
