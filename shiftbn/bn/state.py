"""Swapping BN state safely: snapshots, ``use_stats``, ``load_stats`` and ``freeze_bn``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shiftbn.bn.layers import BNLayer, bn_layers
from shiftbn.bn.moments import BNStats, Moments

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class ModelSnapshot:
    """Everything BN-related that shiftbn may touch, saved so it can be restored bit for bit.

    Saved: the ``training`` flag of every module; for each BN layer its ``momentum``,
    ``track_running_stats`` and the buffer objects with copies of their values.
    """

    def __init__(self, model: nn.Module, layers: list[BNLayer] | None = None) -> None:
        self.model = model
        self.layers = bn_layers(model) if layers is None else layers
        self.training = [(m, m.training) for m in model.modules()]
        self.bn = []
        for layer in self.layers:
            m = layer.module
            bufs = {k: m._buffers.get(k) for k in _BUFFERS if k in m._buffers}
            copies = {k: None if t is None else t.detach().clone() for k, t in bufs.items()}
            self.bn.append((m, m.momentum, m.track_running_stats, bufs, copies))

    def restore(self) -> None:
        """Put every saved flag, hyper-parameter and buffer back (same tensor objects, same bits)."""
        for m, flag in self.training:
            m.training = flag
        for m, momentum, track, bufs, copies in self.bn:
            m.momentum = momentum
            m.track_running_stats = track
            for k in list(m._buffers):
                if k in _BUFFERS and k not in bufs:
                    del m._buffers[k]
            for k, t in bufs.items():
                m._buffers[k] = t
                if t is not None:
                    with torch.no_grad():
                        t.copy_(copies[k])


def write_stats(layers: list[BNLayer], stats: BNStats, *, strict: bool = False) -> None:
    """Write each layer's population mean and variance from ``stats`` into its BN buffers.

    Layers without statistics (never called) keep their buffers unless ``strict``, which raises.
    Layers built with ``track_running_stats=False`` get buffers and start tracking. The variance
    written is the population variance (as fvcore's PreciseBN does), cast to the buffer dtype.
    """
    missing = [layer.name for layer in layers if layer.name not in stats.layers]
    if len(missing) == len(layers):
        raise ValueError(
            f"the statistics match no BN layer of this model (they hold {list(stats.layers)[:5]}...); "
            "were they collected on this model?"
        )
    if missing and strict:
        raise ValueError(f"statistics lack BN layer(s) {missing}; were they collected on this model?")
    for layer in layers:
        mom = stats.layers.get(layer.name)
        if mom is None:
            continue
        m = layer.module
        if mom.channels != m.num_features:
            raise ValueError(
                f"layer {layer.name!r} has {m.num_features} channels but its statistics have {mom.channels}"
            )
        ref = m.weight if m.weight is not None else next(iter(m.buffers()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = m.running_mean.dtype if m.running_mean is not None else torch.float32
        mean = torch.as_tensor(mom.mean, dtype=dtype, device=device)
        var = torch.as_tensor(mom.var, dtype=dtype, device=device)
        with torch.no_grad():
            if m.running_mean is None:
                m._buffers["running_mean"] = mean
                m._buffers["running_var"] = var
                m._buffers["num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=device)
                m.track_running_stats = True
            else:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)


def buffer_stats(model: nn.Module) -> BNStats:
    """The statistics stored in the model's BN buffers (the training EMA), as population moments."""
    out = {}
    for layer in bn_layers(model):
        m = layer.module
        if m.running_mean is not None:
            out[layer.name] = Moments(1, m.running_mean.detach().double().cpu().numpy(),
                                      m.running_var.detach().double().cpu().numpy())
    return BNStats(out, 0)


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with whatever changes it makes to BN state and flags undone on exit."""
    snap = ModelSnapshot(model)
    try:
        yield model
    finally:
        snap.restore()


@contextmanager
def use_stats(
    model: nn.Module, stats: BNStats, *, strict: bool = False, per_site: bool = False
) -> Iterator[nn.Module]:
    """Evaluate ``model`` with ``stats`` in its BN buffers; everything is restored on exit.

    Why: comparing statistics (source, target, per-lab) must never leave the user's model changed.
    Inside, the whole model is in eval mode. ``per_site``: a BN module called several times per
    forward is normalized at its k-th call with the statistics of call site ``"<name>@k"`` (default:
    the merged statistics at every call). On exit — normal, exception or KeyboardInterrupt — every
    buffer, ``training`` flag, ``momentum`` and ``track_running_stats`` is restored bit for bit.
    """
    layers = bn_layers(model)
    snap = ModelSnapshot(model, layers)
    hooks = []
    try:
        model.eval()
        write_stats(layers, stats, strict=strict)
        if per_site:
            hooks = _site_hooks(model, layers, stats)
        yield model
    finally:
        for h in hooks:
            h.remove()
        snap.restore()


def _site_hooks(model: nn.Module, layers: list[BNLayer], stats: BNStats) -> list:
    """Pre-hooks that load call site k's statistics before the k-th call of a shared BN module."""
    calls: dict[str, int] = {}
    hooks = [model.register_forward_pre_hook(lambda module, args: calls.clear())]
    for layer in layers:
        if any(k.startswith(layer.name + "@") for k in stats.layers):
            hooks.append(layer.module.register_forward_pre_hook(_site_loader(layer.name, stats, calls)))
    return hooks


def _site_loader(name: str, stats: BNStats, calls: dict[str, int]):
    n_sites = sum(k.startswith(name + "@") for k in stats.layers)

    def hook(module, args):
        k = calls.get(name, 0)
        calls[name] = k + 1
        mom = stats.layers.get(f"{name}@{k}")
        if mom is None:
            raise ValueError(f"BN layer {name!r} is called more than the {n_sites} call sites its statistics have")
        with torch.no_grad():
            module.running_mean.copy_(torch.as_tensor(mom.mean))
            module.running_var.copy_(torch.as_tensor(mom.var))

    return hook


def load_stats(model: nn.Module, stats: BNStats, *, strict: bool = False) -> None:
    """Permanently write ``stats`` into the model's BN buffers (mean, population variance)."""
    write_stats(bn_layers(model), stats, strict=strict)


class FrozenBN:
    """BN layers normalize with their population statistics even while the model trains.

    Why: the paper's remedy for train-test inconsistency with small normalization batches is to use
    population statistics in the last part of training (Section 4). Active from construction; it
    survives ``model.train()`` calls (a pre-hook keeps BN in eval mode); ``release()`` or leaving the
    ``with`` block restores each BN layer's ``training`` flag. Affine parameters still train.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = bn_layers(model)
        self._flags = [(layer.module, layer.module.training) for layer in self.layers]
        self._hooks = [layer.module.register_forward_pre_hook(_force_eval) for layer in self.layers]
        for layer in self.layers:
            layer.module.train(False)

    def release(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m, flag in self._flags:
            m.training = flag

    def __enter__(self) -> FrozenBN:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _force_eval(module: nn.Module, args):
    module.training = False


def freeze_bn(model: nn.Module) -> FrozenBN:
    """Freeze every BN layer to its population statistics; returns the handle to ``release()`` it."""
    return FrozenBN(model)
