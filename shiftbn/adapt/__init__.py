"""Test-time strategies: objects, the context they see and spec parsing."""

import warnings

from shiftbn.adapt.context import AdaptContext
from shiftbn.adapt.grouped import (
    DEFAULT_GROUPINGS,
    BatchStats,
    Grouped,
    Prior,
    Tent,
    TentOffline,
    grouping_seed,
)
from shiftbn.adapt.prior import prior_batch_logits, prior_stats
from shiftbn.adapt.spec import GRAMMAR, expand_strategies, parse_strategy, register_strategy
from shiftbn.adapt.strategies import (
    EMA,
    PerSource,
    Precise,
    StatsFrom,
    StatsFromEach,
    Strategy,
    Target,
    check_source_name,
)
from shiftbn.adapt.tent import tent_offline_logits, tent_online_logits

__all__ = [
    "DEFAULT_GROUPINGS",
    "EMA",
    "GRAMMAR",
    "AdaptContext",
    "BatchStats",
    "Grouped",
    "PerSource",
    "Precise",
    "Prior",
    "StatsFrom",
    "StatsFromEach",
    "Strategy",
    "Target",
    "Tent",
    "TentOffline",
    "check_source_name",
    "expand_strategies",
    "grouping_seed",
    "parse_strategy",
    "prior_batch_logits",
    "prior_stats",
    "register_strategy",
    "tent_offline_logits",
    "tent_online_logits",
]


def __getattr__(name: str):
    if name == "Source":
        warnings.warn("the strategy class Source is now EMA (strategy 'ema'); Source goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return EMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
