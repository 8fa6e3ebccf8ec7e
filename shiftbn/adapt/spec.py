"""Strategy spec strings (``"prior:16"``, ``"batch:64:mixed"``, ``"stats:*"``): the only code that reads them.

Why: the CLI and TOML specs name strategies as text; the library works with objects. A spec is
``<prefix>`` or ``<prefix>:<arg>``; ``register_strategy(prefix, factory)`` adds a prefix whose
``factory(arg)`` (arg ``None`` when absent) returns a ``Strategy``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

from shiftbn._names import GRAMMAR as GRAMMAR  # re-exported: the grammar lives in a torch-free module
from shiftbn.adapt.grouped import (
    DEFAULT_GROUPINGS,
    BatchStats,
    Prior,
    Tent,
    TentOffline,
)
from shiftbn.adapt.strategies import (
    EMA,
    PerSource,
    Precise,
    StatsFrom,
    StatsFromEach,
    Strategy,
    Target,
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


def _options(kind: str, parts: list[str]) -> tuple[list[str], int]:
    """Split a trailing ``k=K`` (seeded groupings of the test samples) off the ``:``-separated parts."""
    k = DEFAULT_GROUPINGS
    if parts and parts[-1].startswith("k="):
        k = int(_number(kind, parts.pop()[2:], int))
        if k < 1:
            raise ValueError(f"'{kind}:...:k=K' needs K >= 1 groupings, got {k}")
    return parts, k


def _batch(arg: str | None) -> Strategy:
    if arg is None:
        raise ValueError("strategy 'batch' needs a batch size, as in 'batch:64' or 'batch:64:mixed'")
    parts, k = _options("batch", arg.split(":"))
    if not parts:
        raise ValueError(f"'batch:{arg}' needs a batch size first, as in 'batch:64:k=3'")
    size, extra = parts[0], parts[1:]
    if extra not in ([], ["mixed"]):
        raise ValueError(f"unknown batch option {':'.join(extra)!r}; use 'batch:B', 'batch:B:mixed' or "
                         "'batch:B[:mixed]:k=K'")
    return BatchStats(int(_number("batch", size, int)), mixed=extra == ["mixed"], groupings=k)


def _prior(arg: str | None) -> Strategy:
    if arg is None:
        raise ValueError("strategy 'prior' needs a prior strength N, as in 'prior:16', 'prior:16:32' (test "
                         "batches of 32) or 'prior:16@100' (few-shot, 100 calibration samples)")
    head, at, samples = arg.partition("@")
    if at:
        if not samples:
            raise ValueError(f"'prior:{arg}' needs a number of samples after '@', as in 'prior:16@100' or "
                             "'prior:16@all'")
        n = "all" if samples == "all" else int(_number("prior", samples, int))
        return Prior(_number("prior", head, float), samples=n)
    parts, k = _options("prior", head.split(":"))
    if not parts:
        raise ValueError(f"'prior:{arg}' needs a prior strength N first, as in 'prior:16:k=3'")
    if len(parts) > 2:
        raise ValueError(f"unknown prior options in 'prior:{arg}'; use 'prior:N', 'prior:N:B', 'prior:N@n', "
                         "'prior:N[:B]:k=K'")
    batch = int(_number("prior", parts[1], int)) if len(parts) == 2 else 64
    return Prior(_number("prior", parts[0], float), batch=batch, groupings=k)


def _tent(episodic: bool):
    kind = "tent-episodic" if episodic else "tent"

    def make(arg: str | None) -> Strategy:
        parts, k = _options(kind, [] if arg is None else arg.split(":"))
        all_bn = parts == ["all"]
        if parts and not all_bn:
            raise ValueError(f"'{kind}:{arg}': {kind} is the published online form and takes no step count "
                             f"('{kind}' or '{kind}:k=K'); the offline form (S steps on calibration data, then "
                             f"predict) is 'tent-offline:{parts[0]}'; '{kind}:all' adapts every BN layer "
                             "(BatchNorm1d/3d too)")
        return Tent(episodic=episodic, groupings=k, all_bn=all_bn)

    return make


def _old_source(arg: str | None) -> Strategy:
    strategy = _no_arg(EMA)(arg)  # a refused spec is an error alone, without a note about its spelling
    warnings.warn("the strategy 'source' is now spelled 'ema' (the model's stored running statistics); "
                  "'source' goes in the next release", DeprecationWarning, stacklevel=3)
    return strategy


_BUILT_IN: dict[str, StrategyFactory] = {
    "ema": _no_arg(EMA),
    "source": _old_source,
    "precise": _no_arg(Precise),
    "target": _no_arg(Target),
    "per-source": _no_arg(PerSource),
    "prior": _prior,
    "batch": _batch,
    "tent": _tent(episodic=False),
    "tent-episodic": _tent(episodic=True),
    "tent-offline": lambda arg: TentOffline(int(_number("tent-offline", arg, int))),
    "stats": _stats,
}
_REGISTRY: dict[str, StrategyFactory] = dict(_BUILT_IN)
_DEPRECATED = frozenset({"source"})  # old spellings: parsed (with a warning), not listed


def register_strategy(prefix: str, factory: StrategyFactory) -> None:
    """Make ``"<prefix>"`` / ``"<prefix>:<arg>"`` specs build ``factory(arg)`` (arg ``None`` when absent).

    Why: the CLI and TOML study files name strategies as text; registering a prefix lets them name
    your own ``Strategy`` as they name the built-in ones. A registered prefix replaces an earlier one.

    Args:
        prefix: the spec's name before the first ``:`` (non-empty, no ``:``).
        factory: ``factory(arg) -> Strategy``; ``arg`` is the text after the first ``:``, or ``None``.

    Returns:
        None; ``parse_strategy`` builds the prefix's strategies from now on, in this process.

    Raises:
        ValueError: ``prefix`` is empty, not a string or contains ``:``.
        TypeError: ``factory`` is not callable.

    Example:
        >>> from shiftbn.adapt import StatsFrom
        >>> register_strategy("from", lambda arg: StatsFrom(arg or "lab_0"))
        >>> parse_strategy("from"), parse_strategy("from:lab_2")
        (<strategy stats:lab_0>, <strategy stats:lab_2>)
    """
    if not isinstance(prefix, str) or not prefix or ":" in prefix:
        raise ValueError(f"a strategy prefix must be non-empty and contain no ':', got {prefix!r}")
    if not callable(factory):
        raise TypeError(f"register_strategy needs a callable factory(arg) -> Strategy, got {factory!r}")
    _REGISTRY[prefix] = factory


def parse_strategy(spec: str | Strategy) -> Strategy:
    """A strategy from its spec string (``"ema"``, ``"prior:16"``, ``"batch:64:mixed"``...) or itself.

    Why: the one reader of spec strings (``GRAMMAR`` lists them), shared by the library, the CLI and
    study files, so a spec means the same everywhere. ``"source"`` still parses as ``ema``, with a
    ``DeprecationWarning``.

    Args:
        spec: a spec ``<prefix>`` or ``<prefix>:<arg>`` (built-in or ``register_strategy``'d), or a
            ``Strategy`` (returned as is).

    Returns:
        The ``Strategy``.

    Raises:
        ValueError: unknown prefix (the message lists the known ones) or a bad argument (the message
            shows a valid spec).
        TypeError: ``spec`` is neither a string nor a ``Strategy``, or a factory returned no ``Strategy``.

    Example:
        >>> parse_strategy("prior:16:32"), parse_strategy("batch:64:mixed:k=3"), parse_strategy("tent-offline:5")
        (<strategy prior:16:32>, <strategy batch:64:mixed:k=3>, <strategy tent-offline:5>)
        >>> parse_strategy("prior")
        Traceback (most recent call last):
        ...
        ValueError: strategy 'prior' needs a prior strength N, as in 'prior:16', ...
    """
    if isinstance(spec, Strategy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a strategy is a spec string or a Strategy, got {type(spec).__name__}")
    prefix, _, arg = spec.partition(":")
    if prefix not in _REGISTRY:
        known = sorted(set(_REGISTRY) - _DEPRECATED)
        raise ValueError(f"unknown strategy {spec!r}; known: {known} (register_strategy adds more)")
    made = _REGISTRY[prefix](arg or None)
    if not isinstance(made, Strategy):
        raise TypeError(f"the factory registered for {prefix!r} returned {type(made).__name__}, not a Strategy")
    return made


def expand_strategies(specs: Iterable[str | Strategy] | str | Strategy, sources: Sequence[str]) -> list[Strategy]:
    """Parse specs and expand them over ``sources`` (``stats:*`` becomes one ``stats:<name>`` per source).

    Why: the strategies of one matrix call, each once: a repeated name would make two rows of the
    table indistinguishable.

    Args:
        specs: one spec or ``Strategy``, or an iterable of them.
        sources: the dataset's source names.

    Returns:
        A list of ``Strategy`` with distinct names, in the order given.

    Raises:
        ValueError: a spec is invalid, or two strategies have the same name.

    Example:
        >>> expand_strategies(["ema", "stats:*"], ["lab_a", "lab_b"])
        [<strategy ema>, <strategy stats:lab_a>, <strategy stats:lab_b>]
    """
    if isinstance(specs, (str, Strategy)):
        specs = [specs]
    out = [s for spec in specs for s in parse_strategy(spec).expand(sources)]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat: {names}")
    return out
