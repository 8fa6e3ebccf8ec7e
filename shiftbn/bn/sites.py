"""BN call-site keys: ``"<name>@<k>"`` names the k-th call (0-based) of a BN module in one forward."""

from __future__ import annotations

_SEP = "@"


def site_key(name: str, k: int) -> str:
    """The statistics key of call ``k`` (0-based) of BN layer ``name``, e.g. ``"head.bn@1"``.

    Why: a BN module called several times per forward keeps statistics per call site; this is the
    one place that spells such keys (``split_site`` reads them back).
    """
    if not isinstance(name, str):
        raise TypeError(f"a BN layer name must be a str, got {type(name).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"a call index must be an integer >= 0, got {k!r}")
    return f"{name}{_SEP}{k}"


def split_site(key: str) -> tuple[str, int | None]:
    """``(layer name, call index)`` of a statistics key; the index is ``None`` for a merged/plain key.

    Only a trailing ``@<digits>`` is a call index, so names holding dots (or an ``@``) round-trip.
    """
    if not isinstance(key, str):
        raise TypeError(f"a statistics key must be a str, got {type(key).__name__}")
    name, sep, k = key.rpartition(_SEP)
    if sep and k.isascii() and k.isdigit():
        return name, int(k)
    return key, None
