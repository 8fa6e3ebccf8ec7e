"""Observing the input of every BN call site, and stopping a forward after a chosen layer.

Why: statistics collection, per-site loading, prior-weighted BN, the batch audit and per-sample
moments all need the tensor each BN module receives, numbered by call within one forward (a shared
module is called more than once); this module is the one place that registers those hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from shiftbn.bn.layers import BNLayer

OnInput = Callable[[BNLayer, int, torch.Tensor], None]
"""``on_input(layer, call_index, x)``: called before BN module ``layer`` runs on ``x``, its
``call_index``-th call (0-based) in the current forward."""


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised once the ``stop_after`` layer has seen its input; caught by ``BNInputHooks.run``."""


class BNInputHooks:
    """Forward pre-hooks that report every call of the given BN layers (made by ``observe_bn_inputs``).

    Why: one object owns the call counting, the first-call order and the early stop, so the modules
    that watch BN inputs only say what to do with each input.

    Attributes:
        calls: layer name -> number of calls in the current forward (reset when the model's forward
            starts), e.g. ``{"bn1": 1, "head.bn": 2}`` after a forward through a shared head.
        stop_after: name of the layer after whose ``on_input`` the forward stops, or ``None``
            (whole forwards); may be changed between forwards. Only ``run`` catches the stop.

    Args:
        model: the model whose forward is observed.
        layers: the BN layers to observe.
        on_input: ``on_input(layer, call_index, x)``, called before each observed BN call.
        stop_after: see ``stop_after`` above (default ``None``).

    Returns:
        A ``BNInputHooks`` holding the hooks; a context manager that removes them on exit.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> seen = []
        >>> with BNInputHooks(model, bn_layers(model), lambda layer, k, x: seen.append(tuple(x.shape))) as hooks:
        ...     out = hooks.run(torch.randn(5, 4))
        >>> seen, hooks.calls
        ([(5, 3)], {'1': 1})
    """

    def __init__(self, model: nn.Module, layers: Sequence[BNLayer], on_input: OnInput, *,
                 stop_after: str | None = None) -> None:
        self.model = model
        self.on_input = on_input
        self.stop_after = stop_after
        self.calls: dict[str, int] = {}
        self._order: dict[str, None] = {}
        self._handles: dict[str, Any] = {}
        # registered first: on a model that is itself a BN layer it runs before that layer's hook
        self._reset = model.register_forward_pre_hook(lambda module, args: self.calls.clear())
        try:
            for layer in layers:
                # with kwargs: a BN module called as bn(input=x) is observed too
                self._handles[layer.name] = layer.module.register_forward_pre_hook(self._hook(layer),
                                                                                   with_kwargs=True)
        except BaseException:
            self.remove()
            raise

    def _hook(self, layer: BNLayer):
        name = layer.name

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            k = self.calls.get(name, 0)
            self.calls[name] = k + 1
            self._order.setdefault(name)
            # the module called: a deep copy of the model carries this hook to its own copy of the layer
            x = args[0] if args else kwargs["input"]
            self.on_input(layer if module is layer.module else BNLayer(name, layer.depth, module), k, x)
            if self.stop_after == name:
                raise _StopForward

        return hook

    @property
    def order(self) -> list[str]:
        """Names of the observed layers in first-call order, over every forward so far."""
        return list(self._order)

    @property
    def observed(self) -> list[str]:
        """Names of the layers observed now (those given, less the ones ``release``d)."""
        return list(self._handles)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model, catching the stop after ``stop_after``.

        Why: a forward cut short after the measured layer is not an error.

        Args:
            *args: the model's positional inputs.
            **kwargs: the model's keyword inputs.

        Returns:
            The model's output, or ``None`` when the forward stopped after ``stop_after``.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
            >>> with observe_bn_inputs(model, bn_layers(model), lambda *a: None, stop_after="1") as hooks:
            ...     print(hooks.run(torch.randn(5, 4)))
            None
        """
        try:
            return self.model(*args, **kwargs)
        except _StopForward:
            return None

    def call(self, forward: Callable[[], Any]) -> Any:
        """Run ``forward()``, a closure that runs the model (e.g. a user's ``forward(model, x)``), catching
        the stop after ``stop_after`` as ``run`` does.

        Why: a user's forward may call the model in its own way (several inputs, micro-batches).

        Args:
            forward: called with no argument.

        Returns:
            What ``forward()`` returned, or ``None`` when the forward stopped after ``stop_after``.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            >>> with observe_bn_inputs(model, bn_layers(model), lambda *a: None) as hooks:
            ...     out = hooks.call(lambda: torch.cat([model(torch.randn(3, 4)), model(torch.randn(3, 4))]))
            >>> out.shape, hooks.calls
            (torch.Size([6, 3]), {'1': 1})
        """
        try:
            return forward()
        except _StopForward:
            return None

    def release(self, name: str) -> None:
        """Stop observing layer ``name``.

        Why: a layer done with (e.g. converged in sequential mode) then runs on PyTorch's hook-free path.

        Args:
            name: the layer's name; unknown or already released names are ignored.

        Returns:
            None.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            >>> with observe_bn_inputs(model, bn_layers(model), lambda *a: None) as hooks:
            ...     hooks.release("1")
            ...     hooks.observed
            []
        """
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def remove(self) -> None:
        """Remove every hook; the model is as it was before ``observe_bn_inputs``.

        Why: hooks left behind would slow and change every later forward of the user's model.

        Args:
            None.

        Returns:
            None.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            >>> hooks = observe_bn_inputs(model, bn_layers(model), lambda *a: None)
            >>> hooks.remove()
            >>> len(model[1]._forward_pre_hooks), len(model._forward_pre_hooks)
            (0, 0)
        """
        for name in list(self._handles):
            self.release(name)
        self._reset.remove()

    def __enter__(self) -> BNInputHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def observe_bn_inputs(model: nn.Module, layers: Sequence[BNLayer], on_input: OnInput, *,
                      stop_after: str | None = None) -> BNInputHooks:
    """Call ``on_input(layer, call_index, x)`` before each BN layer of ``layers`` runs on ``x``.

    Why: BN statistics are functions of the tensor each BN call receives; a forward pre-hook sees
    it without changing the model's code, and stopping right after the layer being measured saves
    the rest of the forward. Hooks are forward pre-hooks (``on_input`` runs before BN normalizes, so
    it may also write the statistics BN is about to use); nothing else of the model is touched.

    Args:
        model: the model whose forward is observed (its root gets one pre-hook that resets the
            per-forward call counts).
        layers: the BN layers to observe (``bn_layers(model)`` or a subset); others run unhooked.
        on_input: ``on_input(layer, call_index, x)`` with the ``BNLayer``, the 0-based index of this
            call of its module in the current forward, and the input tensor (N, C, *).
        stop_after: a layer name: after its ``on_input`` the forward stops (``BNInputHooks.run``
            returns ``None``); ``None`` runs whole forwards.

    Returns:
        ``BNInputHooks``: a context manager (hooks removed on exit, also on exceptions) with
        ``run``, ``calls``, ``order``, ``observed``, ``stop_after``, ``release`` and ``remove``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2), nn.BatchNorm1d(2))
        >>> inputs = {}
        >>> def keep(layer, k, x):
        ...     inputs[(layer.name, k)] = tuple(x.shape)
        >>> with observe_bn_inputs(model, bn_layers(model), keep, stop_after="1") as hooks:
        ...     out = hooks.run(torch.randn(5, 4))  # stops after the input of layer "1" was seen
        >>> out is None, inputs
        (True, {('1', 0): (5, 3)})
    """
    return BNInputHooks(model, layers, on_input, stop_after=stop_after)
