"""Test-time strategies: objects, the context they see and spec parsing."""

from shiftbn.adapt.context import AdaptContext
from shiftbn.adapt.prior import prior_batch_logits, prior_stats
from shiftbn.adapt.spec import GRAMMAR, expand_strategies, parse_strategy, register_strategy
from shiftbn.adapt.strategies import (
    DEFAULT_GROUPINGS,
    BatchStats,
    Grouped,
    PerSource,
    Precise,
    Prior,
    Source,
    StatsFrom,
    StatsFromEach,
    Strategy,
    Target,
    Tent,
    TentOffline,
    check_source_name,
    grouping_seed,
)
from shiftbn.adapt.tent import tent_offline_logits, tent_online_logits

__all__ = [
    "DEFAULT_GROUPINGS",
    "GRAMMAR",
    "AdaptContext",
    "BatchStats",
    "Grouped",
    "PerSource",
    "Precise",
    "Prior",
    "Source",
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
