"""Thin adapters for the libraries users already train with: Lightning, plain PyTorch loops, and
timm / torchvision / MONAI models named by string.

Each optional dependency is imported only when its adapter is used: ``shiftbn.integrations.lightning``
needs ``lightning``; ``refresh_bn`` (``loops``) and ``model_factory`` (``models``) need nothing beyond
shiftbn (a library named in a model string must be installed).
"""

from shiftbn.integrations.loops import BNRefresh, refresh_bn
from shiftbn.integrations.models import model_factory, parse_model_kwargs

__all__ = ["BNRefresh", "model_factory", "parse_model_kwargs", "refresh_bn"]


def __getattr__(name: str):
    if name == "PreciseBNCallback":  # imports lightning: only on request
        from shiftbn.integrations.lightning import PreciseBNCallback

        return PreciseBNCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
