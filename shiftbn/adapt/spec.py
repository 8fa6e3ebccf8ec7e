"""Strategy spec strings (``"prior:16"``, ``"batch:64:mixed"``, ``"stats:*"``): the only code that reads them.

Why: the CLI and TOML specs name strategies as text; the library works with objects. A spec is
``<prefix>`` or ``<prefix>:<arg>``; ``register_strategy(prefix, factory)`` adds a prefix whose
``factory(arg)`` (arg ``None`` when absent) returns a ``Strategy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from shiftbn._names import GRAMMAR as GRAMMAR  # re-exported: the grammar lives in a torch-free module
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

StrategyFactory = Callable[[str | None], Strategy]


def _no_arg(cls: type[Strategy]) -> StrategyFactory:
    def make(arg: str | None) -> Strategy:
        if arg is not None:
            raise ValueError(f"strategy {cls.name!r} takes no argument, got {arg!r}")
        return cls()

    return make


def _number(kind: str, arg: str | None, conv: type) -> float:
    try:
        value = conv(arg)
    except (TypeError, ValueError):
        raise ValueError(f"strategy {kind!r} needs a number, as in '{kind}:16'; got {arg!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"strategy {kind!r} needs a finite number, as in '{kind}:16'; got {arg!r}")
    return value


def _stats(arg: str | None) -> Strategy:
    if not arg:
        raise ValueError("strategy 'stats' needs a source name, as in 'stats:lab_a' (or 'stats:*' for every source)")
    return StatsFromEach() if arg == "*" else StatsFrom(arg)


def _batch(arg: str | None) -> Strategy:
    if arg is None:
        raise ValueError("strategy 'batch' needs a batch size, as in 'batch:64' or 'batch:64:mixed'")
    size, _, extra = arg.partition(":")
    if extra not in ("", "mixed"):
        raise ValueError(f"unknown batch option {extra!r}; use 'batch:B' or 'batch:B:mixed'")
    return BatchStats(int(_number("batch", size, int)), mixed=extra == "mixed")


_BUILT_IN: dict[str, StrategyFactory] = {
    "source": _no_arg(Source),
    "precise": _no_arg(Precise),
    "target": _no_arg(Target),
    "per-source": _no_arg(PerSource),
    "prior": lambda arg: Prior(_number("prior", arg, float)),
    "batch": _batch,
    "tent": lambda arg: Tent(int(_number("tent", arg, int))),
    "stats": _stats,
}
_REGISTRY: dict[str, StrategyFactory] = dict(_BUILT_IN)


def register_strategy(prefix: str, factory: StrategyFactory) -> None:
    """Make ``"<prefix>"`` / ``"<prefix>:<arg>"`` specs build ``factory(arg)`` (arg ``None`` when absent)."""
    if not isinstance(prefix, str) or not prefix or ":" in prefix:
        raise ValueError(f"a strategy prefix must be non-empty and contain no ':', got {prefix!r}")
    if not callable(factory):
        raise TypeError(f"register_strategy needs a callable factory(arg) -> Strategy, got {factory!r}")
    _REGISTRY[prefix] = factory


def parse_strategy(spec: str | Strategy) -> Strategy:
    """A strategy from its spec string (``"source"``, ``"prior:16"``, ``"batch:64:mixed"``...) or itself."""
    if isinstance(spec, Strategy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a strategy is a spec string or a Strategy, got {type(spec).__name__}")
    prefix, _, arg = spec.partition(":")
    if prefix not in _REGISTRY:
        raise ValueError(f"unknown strategy {spec!r}; known: {sorted(_REGISTRY)} (register_strategy adds more)")
    made = _REGISTRY[prefix](arg or None)
    if not isinstance(made, Strategy):
        raise TypeError(f"the factory registered for {prefix!r} returned {type(made).__name__}, not a Strategy")
    return made


def expand_strategies(specs: Iterable[str | Strategy] | str | Strategy, sources: Sequence[str]) -> list[Strategy]:
    """Parse specs and expand them over ``sources`` (``stats:*`` becomes one ``stats:<name>`` per source)."""
    if isinstance(specs, (str, Strategy)):
        specs = [specs]
    out = [s for spec in specs for s in parse_strategy(spec).expand(sources)]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat: {names}")
    return out
