"""BN call-site keys: ``"<name>@<k>"`` names the k-th call (0-based) of a BN module in one forward."""

from __future__ import annotations

_SEP = "@"


def site_key(name: str, k: int) -> str:
    """The statistics key of call ``k`` (0-based) of BN layer ``name``, e.g. ``"head.bn@1"``.

    Why: a BN module called several times per forward keeps statistics per call site; this is the
    one place that spells such keys (``split_site`` reads them back).

    Args:
        name: the BN layer's qualified name.
        k: the 0-based call index in one forward.

    Returns:
        The key ``"<name>@<k>"`` (str).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``k`` is not an integer >= 0.

    Example:
        >>> site_key("head.bn", 1)
        'head.bn@1'
    """
    if not isinstance(name, str):
        raise TypeError(f"a BN layer name must be a str, got {type(name).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"a call index must be an integer >= 0, got {k!r}")
    return f"{name}{_SEP}{k}"


def split_site(key: str) -> tuple[str, int | None]:
    """``(layer name, call index)`` of a statistics key; the index is ``None`` for a merged/plain key.

    Why: only a trailing ``@<digits>`` is a call index, so names holding dots (or an ``@``)
    round-trip through ``site_key``.

    Args:
        key: a statistics key (a layer name, or ``site_key``'s output).

    Returns:
        ``(name, k)``; ``k`` is ``None`` for a merged or plain key.

    Raises:
        TypeError: ``key`` is not a str.

    Example:
        >>> split_site("head.bn@1"), split_site("head.bn")
        (('head.bn', 1), ('head.bn', None))
    """
    if not isinstance(key, str):
        raise TypeError(f"a statistics key must be a str, got {type(key).__name__}")
    name, sep, k = key.rpartition(_SEP)
    if sep and k.isascii() and k.isdigit():
        return name, int(k)
    return key, None
