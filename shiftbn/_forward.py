"""How one batch goes through a model, and what of its outputs is kept: the user's ``forward(model, x)``
and a per-batch reduction (e.g. per-case segmentation scores).

Why: multi-input models, dict batches, sliding-window inference and micro-batching run the model in
their own way (pytorch/pytorch#49082 asks ``update_bn`` for exactly this); dense outputs (a logit per
voxel) must be scored batch by batch, never kept whole. Every loop that runs a model for shiftbn
calls ``Runner.outputs``, so a user's forward and a reduction reach statistics, strategies and scores
alike. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, x) -> outputs``: ``x`` is one batch of inputs (the collated inputs of the items: a
tensor, or the tuple/dict the items hold), already on the model's device."""

Reduce = Callable[[torch.Tensor, Any], torch.Tensor]
"""``reduce(outputs, targets) -> (B, R)``: what is kept of a batch's outputs, given its targets."""


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    return x


def batch_length(x: Any) -> int:
    """Samples in a batch of inputs: the first dimension of its first tensor."""
    if isinstance(x, torch.Tensor):
        return len(x)
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        n = batch_length(v)
        if n >= 0:
            return n
    return -1


def check_forward(forward: Any, what: str = "forward") -> Forward | None:
    """``forward`` if it is ``None`` or callable; else a ``TypeError`` that says what it must be."""
    if forward is not None and not callable(forward):
        raise TypeError(f"{what} must be a callable forward(model, x) -> outputs (or None for model(x)), "
                        f"got {type(forward).__name__}")
    return forward


@dataclass(frozen=True)
class Runner:
    """A batch's way through the model: the user's ``forward`` (default ``model(x)``) and what is kept.

    Why: one object carries both, so every loop (statistics, strategies, Tent, prior) runs the user's
    forward and keeps only what the task needs.

    Args:
        forward: ``forward(model, x) -> outputs`` (``x`` on the model's device), or ``None`` for ``model(x)``.
        reduce: ``reduce(outputs, targets) -> (B, R)`` applied to each batch's outputs, or ``None`` to
            keep the outputs (as float32 on the CPU).

    Returns:
        A frozen ``Runner``; ``outputs(model, x, device)`` runs one batch, ``keep(outputs, targets)``
        reduces it.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> halves = Runner(forward=lambda m, x: torch.cat([m(x[:2]), m(x[2:])]))
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(halves.outputs(model, x, torch.device("cpu")), model(x))
        True
    """

    forward: Forward | None = None
    reduce: Reduce | None = None

    def __post_init__(self) -> None:
        check_forward(self.forward)
        if self.reduce is not None and not callable(self.reduce):
            raise TypeError(f"reduce must be a callable reduce(outputs, targets), got {type(self.reduce).__name__}")

    def run(self, model: nn.Module, x: Any, device: torch.device) -> Any:
        """Whatever the forward returns on one batch of inputs ``x`` (moved to ``device``); statistics
        passes need no outputs, so none are checked."""
        x = to_device(x, device)
        return model(x) if self.forward is None else self.forward(model, x)

    def outputs(self, model: nn.Module, x: Any, device: torch.device) -> torch.Tensor:
        """The model's outputs on one batch of inputs ``x`` (moved to ``device``), through ``forward``:
        one tensor with one row per sample."""
        out = self.run(model, x, device)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the forward must return one tensor of outputs (N, ...), got {type(out).__name__}; "
                            "return the logits (e.g. out['logits'] or out[0]) from your forward(model, x)")
        n = batch_length(x)
        if n >= 0 and len(out) != n:
            raise ValueError(f"the forward returned {len(out)} rows for a batch of {n} samples; it must return one "
                             "output per sample, in the batch's order")
        return out

    def keep(self, out: torch.Tensor, targets: Any) -> torch.Tensor:
        """What is kept of one batch's outputs: ``reduce(outputs, targets)``, or the outputs as float32 on the CPU."""
        if self.reduce is None:
            return out.float().cpu()
        return self.reduce(out.detach(), targets)


PLAIN = Runner()
"""``model(x)``, outputs kept."""
