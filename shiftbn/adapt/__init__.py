"""Test-time strategies: objects, the context they see, spec parsing, and ``recalibrate``."""

from shiftbn.adapt.context import AdaptContext
from shiftbn.adapt.recalibrate import RecalibrationMethod, recalibrate
from shiftbn.adapt.spec import GRAMMAR, expand_strategies, parse_strategy, register_strategy
from shiftbn.adapt.strategies import (
    BatchStats,
    PerSource,
    Precise,
    Prior,
    Source,
    StatsFrom,
    StatsFromEach,
    Strategy,
    Target,
    Tent,
)

__all__ = [
    "GRAMMAR",
    "AdaptContext",
    "BatchStats",
    "PerSource",
    "Precise",
    "Prior",
    "RecalibrationMethod",
    "Source",
    "StatsFrom",
    "StatsFromEach",
    "Strategy",
    "Target",
    "Tent",
    "expand_strategies",
    "parse_strategy",
    "recalibrate",
    "register_strategy",
]
