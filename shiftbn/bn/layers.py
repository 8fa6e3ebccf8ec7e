"""Finding the BatchNorm layers of a model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import is_lazy

from shiftbn._torch import device_of as device_of  # re-exported: one helper for every layer

_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm)

TORCH_BN_FORWARDS = frozenset({nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward,
                               nn.SyncBatchNorm.forward})
"""The ``forward`` functions of torch's own BN classes: a module whose class has another one (timm's
``BatchNormAct2d``, a ghost BN) may change its input before it normalizes."""


@dataclass(frozen=True)
class BNLayer:
    """One BN module of a model, as ``bn_layers`` finds it.

    Why: statistics are keyed by the module's qualified name; ``depth`` orders the shift profile.

    Args:
        name: the qualified module name (``"<root>"`` for a model that is itself a BN layer).
        depth: 0 for the first BN module registered, 1 for the next, ...
        module: the BN module itself.

    Returns:
        A frozen ``BNLayer``; ``tracks`` says whether it keeps running statistics.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
        >>> layer = bn_layers(model)[0]
        >>> layer.name, layer.depth, layer.tracks
        ('1', 0, False)
    """

    name: str
    depth: int
    module: _BatchNorm

    @property
    def tracks(self) -> bool:
        """Whether the layer keeps running statistics buffers (``track_running_stats=True``)."""
        return self.module.running_mean is not None


def bn_layers(model: nn.Module) -> list[BNLayer]:
    """Every BatchNorm1d/2d/3d, SyncBatchNorm and lazy BN module, in registration (depth) order.

    Why: recalibration acts on BN buffers only; other normalization layers (GroupNorm, LayerNorm,
    InstanceNorm) keep no population statistics, so they are reported with a warning and skipped.

    Args:
        model: any ``torch.nn.Module``.

    Returns:
        A list of ``BNLayer`` (name, depth, module), in ``model.named_modules()`` order.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: the model has no BN layer.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyBatchNorm1d())
        >>> [(layer.name, layer.depth) for layer in bn_layers(model)]
        [('1', 0), ('3', 1)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = all_bn_layers(model)
    others = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(m, _OTHER_NORMS)]
    if others:
        warnings.warn(
            "normalization layers that are not BatchNorm keep no population statistics and are left "
            f"as they are: {', '.join(others)}",
            stacklevel=2,
        )
    if not found:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer; shiftbn recalibrates BN statistics only")
    return found


def all_bn_layers(model: nn.Module) -> list[BNLayer]:
    """The BN modules ``bn_layers`` finds, without its checks: none is an empty list, other norms pass silently.

    Why: a verb that only switches how BN layers normalize (``batch_statistics``) runs any model, with
    BN layers or without.

    Args:
        model: a ``torch.nn.Module``.

    Returns:
        A list of ``BNLayer`` (name, depth, module), in ``model.named_modules()`` order.

    Example:
        >>> [layer.name for layer in all_bn_layers(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))]
        ['1']
        >>> all_bn_layers(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
        []
    """
    named = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    return [BNLayer(name, depth, m) for depth, (name, m) in enumerate(named)]


def cycle_positions(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """``(module, position)`` of every module that cycles through several BN layers, one per call.

    Why: detectron2's ``CycleBatchNormList`` (domain-specific BN by cycling, paper Section 5.2) is a
    ``ModuleList`` of BN layers with an integer ``_pos`` that each call advances; a forward cut short
    (a truncated statistics pass, an exception) leaves it pointing at the wrong layer, so callers put
    the positions back with ``set_positions``. Its BN children are found by ``bn_layers`` as usual.
    """
    return [(m, m._pos) for m in model.modules()
            if isinstance(m, nn.ModuleList) and len(m) and all(isinstance(c, _BatchNorm) for c in m)
            and isinstance(getattr(m, "_pos", None), int)]


def set_positions(positions: list[tuple[nn.Module, int]]) -> None:
    """Put the cycling positions recorded by ``cycle_positions`` back."""
    for m, pos in positions:
        m._pos = pos


def check_materialized(layers: list[BNLayer]) -> None:
    """Raise if a lazy BN layer has not seen its first input yet (its buffers do not exist)."""
    for layer in layers:
        tensors = list(layer.module.parameters(recurse=False)) + list(layer.module.buffers(recurse=False))
        if any(is_lazy(t) for t in tensors):
            raise ValueError(
                f"lazy BN layer {layer.name!r} is not initialized; run the model once on a batch first"
            )

