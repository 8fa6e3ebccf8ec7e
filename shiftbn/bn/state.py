"""Swapping BN state safely: snapshots, ``use_stats``, ``load_stats`` and ``freeze_bn``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from shiftbn.bn.hooks import BNInputHooks, observe_bn_inputs
from shiftbn.bn.layers import BNLayer, bn_layers, cycle_positions, set_positions
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import BNStats, SourceStats, check_moments
from shiftbn.bn.population import Population, PopulationStats
from shiftbn.bn.sites import site_key, split_site

AnyStats = BNStats | PopulationStats


class ModelSnapshot:
    """Everything shiftbn may touch, saved so it can be restored bit for bit.

    Saved: the ``training`` flag of every module; every module's buffers (the tensor objects, copies
    of their values, which names exist and which are non-persistent: a forward may update a custom
    buffer too); for each BN layer its ``momentum`` and ``track_running_stats``; the position of
    every module cycling through BN layers (``cycle_positions``).

    Why: verbs that swap BN state must leave the user's model exactly as it was (``preserved``,
    ``use_stats``, ``collect_stats`` restore from one of these in ``finally``).

    Args:
        model: the model to snapshot.
        layers: its BN layers (default: ``bn_layers(model)``).

    Returns:
        A ``ModelSnapshot``; ``restore()`` puts everything back.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> snap = ModelSnapshot(model)
        >>> _ = model.train()(torch.randn(8, 4))  # updates the running statistics
        >>> snap.restore()
        >>> model[1].running_mean.tolist(), model[1].num_batches_tracked.item()
        ([0.0, 0.0, 0.0], 0)
    """

    def __init__(self, model: nn.Module, layers: list[BNLayer] | None = None) -> None:
        self.model = model
        self.layers = bn_layers(model) if layers is None else layers
        self.training = [(m, m.training) for m in model.modules()]
        self.buffers = []
        for m in model.modules():
            bufs = dict(m._buffers)
            copies = {k: None if t is None or is_lazy(t) else t.detach().clone() for k, t in bufs.items()}
            self.buffers.append((m, bufs, copies, set(m._non_persistent_buffers_set)))
        self.bn = [(layer.module, layer.module.momentum, layer.module.track_running_stats) for layer in self.layers]
        self.cycles = cycle_positions(model)

    def restore(self) -> None:
        """Put every saved flag, hyper-parameter and buffer back (same tensor objects, same bits).

        Why: tensors are copied into, not replaced, so optimizers and references stay valid.

        Args:
            None.

        Returns:
            None.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
            >>> snap = ModelSnapshot(model)
            >>> model[1].momentum = None
            >>> _ = model.train()
            >>> snap.restore()
            >>> model.training, model[1].momentum
            (False, 0.1)
        """
        for m, flag in self.training:
            m.training = flag
        set_positions(self.cycles)
        for m, momentum, track in self.bn:
            m.momentum = momentum
            m.track_running_stats = track
        first: BaseException | None = None
        with torch.no_grad():
            for m, bufs, copies, non_persistent in self.buffers:
                for k in [k for k in m._buffers if k not in bufs]:
                    del m._buffers[k]
                for k, t in bufs.items():
                    m._buffers[k] = t
                    # an inference tensor cannot have been written in place outside inference mode
                    if copies[k] is None or (t.is_inference() and not torch.is_inference_mode_enabled()):
                        continue
                    try:
                        if t.shape == copies[k].shape:
                            t.copy_(copies[k])
                        else:  # resized in place by the block: take the saved tensor's storage back
                            t.set_(copies[k])
                    except RuntimeError as e:  # restore every other buffer before reporting it
                        first = first or e
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
        if first is not None:
            raise first


def _check_stats_type(stats: object, verb: str) -> None:
    if isinstance(stats, SourceStats):
        raise TypeError(f"{verb} takes the statistics of one set of samples, got SourceStats; pick one "
                        "source (stats['name']) or stats.pooled()")
    if not isinstance(stats, (BNStats, PopulationStats)):
        raise TypeError(f"{verb} needs BNStats or PopulationStats, got {type(stats).__name__}")


def _checked_arrays(key: str, entry: object, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (mean, var) of one statistics entry (``Moments`` or ``Population``)."""
    if not isinstance(entry, Population) and getattr(entry, "count", 1) < 1:
        raise ValueError(f"layer {key!r}: statistics from count {entry.count} (no sample) cannot be loaded")
    mean = np.asarray(entry.mean, dtype=np.float64)
    var = np.asarray(entry.var, dtype=np.float64)
    check_moments(mean, var, f"layer {key!r}", channels=channels)
    return mean, var


def prepare_writes(layers: list[BNLayer], stats: AnyStats, *, strict: bool = False) -> list:
    """Validate ``stats`` against ``layers`` and convert them to buffer tensors; writes nothing.

    Returns ``(module, mean, var)`` per layer with statistics, for ``apply_writes``.
    """
    _check_stats_type(stats, "write_stats")
    missing = [layer.name for layer in layers if layer.name not in stats.layers]
    if len(missing) == len(layers):
        raise ValueError(
            f"the statistics match no BN layer of this model (they hold {list(stats.layers)[:5]}...); "
            "were they collected on this model?"
        )
    if missing and strict:
        raise ValueError(f"statistics lack BN layer(s) {missing}; were they collected on this model?")
    plan = []
    for layer in layers:
        entry = stats.layers.get(layer.name)
        if entry is None:
            continue
        m = layer.module
        mean, var = _checked_arrays(layer.name, entry, m.num_features)
        ref = m.weight if m.weight is not None else next(iter(m.buffers()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = m.running_mean.dtype if m.running_mean is not None else torch.float32
        plan.append((m, torch.as_tensor(mean, dtype=dtype, device=device),
                     torch.as_tensor(var, dtype=dtype, device=device)))
    return plan


def apply_writes(plan: list) -> None:
    """Copy prepared ``(module, mean, var)`` into the BN buffers (created for untracked layers)."""
    with torch.no_grad():
        for m, mean, var in plan:
            if m.running_mean is None:
                m._buffers["running_mean"] = mean.clone()
                m._buffers["running_var"] = var.clone()
                m._buffers["num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=mean.device)
                m.track_running_stats = True
            else:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)


def write_stats(layers: list[BNLayer], stats: AnyStats, *, strict: bool = False) -> None:
    """Write each layer's population mean and variance from ``stats`` into its BN buffers.

    All-or-nothing: every layer's entry is validated first (channel count, finite mean and var,
    var >= 0: else ``ValueError`` naming the layer), then written. Layers without statistics (never
    called) keep their buffers unless ``strict``, which raises. Layers built with
    ``track_running_stats=False`` get buffers and start tracking. The variance written is the
    population variance (as fvcore's PreciseBN does), cast to the buffer dtype.
    """
    apply_writes(prepare_writes(layers, stats, strict=strict))


def untracked(layers: list[BNLayer]) -> list[str]:
    """Names of the BN layers without running statistics (``track_running_stats=False``, no buffers)."""
    return [layer.name for layer in layers if layer.module.running_mean is None]


def buffer_stats(model: nn.Module) -> PopulationStats:
    """The statistics stored in the model's BN buffers (the training EMA), as ``PopulationStats``.

    Why: the EMA is the baseline every strategy is compared with; it is a population parameter,
    not a sample, so it comes back as ``PopulationStats`` (never merged).

    Args:
        model: the model.

    Returns:
        ``PopulationStats`` (layer name -> mean, var (C,) float64 copies), ``num_samples`` None.

    Raises:
        ValueError: BN layers keep no running statistics (``track_running_stats=False``); named.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> ema = buffer_stats(model)
        >>> ema["1"].mean.tolist(), ema["1"].var.tolist()
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    """
    layers = bn_layers(model)
    missing = untracked(layers)
    if missing:
        raise ValueError(
            f"BN layer(s) {missing} keep no running statistics (track_running_stats=False), so the model "
            "has no stored statistics for them; compute some first with collect_stats (then use_stats) "
            "or precise_bn"
        )
    return PopulationStats({
        layer.name: Population(layer.module.running_mean.detach().double().cpu().numpy(),
                               layer.module.running_var.detach().double().cpu().numpy())
        for layer in layers
    })


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with whatever changes it makes to flags and buffers undone on exit.

    Why: experiments (a training step, AdaBN) on a model must not change the user's copy.
    Holds the model's lock (``model_lock``) for the block; restores also on exceptions.

    Args:
        model: the model.

    Returns:
        A context manager yielding ``model``; on exit its state is restored (``ModelSnapshot``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> with preserved(model):
        ...     _ = model.train()(torch.randn(8, 4) + 5)  # moves the running mean
        >>> model[1].running_mean.tolist()
        [0.0, 0.0, 0.0]
    """
    with model_lock(model):
        snap = ModelSnapshot(model)
        try:
            yield model
        finally:
            snap.restore()


@contextmanager
def use_stats(
    model: nn.Module, stats: AnyStats, *, strict: bool = False, per_site: bool = False
) -> Iterator[nn.Module]:
    """Evaluate ``model`` with ``stats`` (``BNStats`` or ``PopulationStats``) in its BN buffers.

    Why: comparing statistics (source, target, per-lab) must never leave the user's model changed.
    Inside, the whole model is in eval mode. ``per_site``: a BN module called several times per
    forward is normalized at its k-th call with the statistics of call site ``"<name>@k"`` (default:
    the merged statistics at every call). On exit — normal, exception or KeyboardInterrupt — every
    buffer, ``training`` flag, ``momentum`` and ``track_running_stats`` is restored bit for bit.
    Holds the model's lock (``model_lock``) for the block.

    Args:
        model: the model.
        stats: ``BNStats`` or ``PopulationStats`` of one set of samples (not ``SourceStats``: pick
            ``stats["name"]`` or ``stats.pooled()``).
        strict: raise when a BN layer has no statistics (default: such layers keep their buffers).
        per_site: load call-site statistics ``"<name>@k"`` at each call (default False).

    Returns:
        A context manager yielding ``model`` in eval mode with ``stats`` in its BN buffers.

    Raises:
        TypeError: ``stats`` of another type.
        ValueError: statistics that match no layer or have wrong channels, NaN or negative variances.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> stats = collect_stats(model, ds, progress=False)
        >>> with use_stats(model, stats["lab_1"]):
        ...     inside = model[1].running_mean.clone()
        ...     logits = model(torch.randn(5, 4))
        >>> bool(inside.abs().sum() > 0), model[1].running_mean.tolist()
        (True, [0.0, 0.0, 0.0])
    """
    with model_lock(model):
        layers = bn_layers(model)
        snap = ModelSnapshot(model, layers)
        hooks = None
        try:
            model.eval()
            write_stats(layers, stats, strict=strict)
            if per_site:
                hooks = _site_hooks(model, layers, stats)
            yield model
        finally:
            if hooks is not None:
                hooks.remove()
            snap.restore()


def _sites(stats: AnyStats) -> dict[str, list[str]]:
    """Layer name -> its call-site keys in ``stats``, in call order."""
    out: dict[str, list[tuple[int, str]]] = {}
    for key in stats.layers:
        name, k = split_site(key)
        if k is not None:
            out.setdefault(name, []).append((k, key))
    return {name: [key for _, key in sorted(v)] for name, v in out.items()}


def _site_hooks(model: nn.Module, layers: list[BNLayer], stats: AnyStats) -> BNInputHooks:
    """Pre-hooks that load call site k's statistics before the k-th call of a shared BN module.

    Every site's statistics are validated and converted before any hook is installed.
    """
    sites = _sites(stats)
    loads = {}
    for layer in layers:
        for key in sites.get(layer.name, []):
            m = layer.module
            if m.running_mean is None:
                raise ValueError(f"per_site: layer {layer.name!r} has call-site statistics but no merged "
                                 f"entry {layer.name!r} and no running statistics to load them into")
            mean, var = _checked_arrays(key, stats.layers[key], m.num_features)
            loads[key] = (torch.as_tensor(mean, dtype=m.running_mean.dtype, device=m.running_mean.device),
                          torch.as_tensor(var, dtype=m.running_var.dtype, device=m.running_var.device))

    def load_site(layer: BNLayer, k: int, x: torch.Tensor) -> None:
        tensors = loads.get(site_key(layer.name, k))
        if tensors is None:
            raise ValueError(f"BN layer {layer.name!r} is called more than the {len(sites[layer.name])} call sites "
                             "its statistics have")
        with torch.no_grad():
            layer.module.running_mean.copy_(tensors[0])
            layer.module.running_var.copy_(tensors[1])

    return observe_bn_inputs(model, [layer for layer in layers if layer.name in sites], load_site)


def load_stats(model: nn.Module, stats: AnyStats, *, strict: bool = False) -> None:
    """Permanently write ``stats`` (``BNStats`` or ``PopulationStats``) into the BN buffers.

    Why: deploying recalibrated statistics (AdaBN, PreciseBN) means writing them for good.
    All-or-nothing: every layer is validated before any buffer is written (see ``write_stats``).

    Args:
        model: the model; its BN buffers are written in place.
        stats: ``BNStats`` or ``PopulationStats`` of one set of samples.
        strict: raise when a BN layer has no statistics (default: such layers keep their buffers).

    Returns:
        None.

    Raises:
        TypeError: ``stats`` of another type.
        ValueError: statistics that match no layer or have wrong channels, NaN or negative variances.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> stats = PopulationStats({"1": Population(np.array([1.0, 2.0, 3.0]), np.full(3, 4.0))})
        >>> load_stats(model, stats)
        >>> model[1].running_mean.tolist(), model[1].running_var.tolist()
        ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    """
    with model_lock(model):
        write_stats(bn_layers(model), stats, strict=strict)


class FrozenBN:
    """BN layers normalize with their population statistics even while the model trains.

    Why: the paper's remedy for train-test inconsistency with small normalization batches is to use
    population statistics in the last part of training (Section 4). Active from construction; it
    survives ``model.train()`` calls (a pre-hook keeps BN in eval mode); ``release()`` or leaving the
    ``with`` block restores each BN layer's ``training`` flag. Affine parameters still train.
    Raises ``ValueError`` naming BN layers with ``track_running_stats=False``: in eval mode they
    would still normalize with batch statistics (load statistics first: ``load_stats``/``precise_bn``).

    Args:
        model: the model whose BN layers freeze.

    Returns:
        A ``FrozenBN`` handle (a context manager); ``layers`` lists the frozen ``BNLayer``.

    Raises:
        ValueError: BN layers without running statistics; named.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> with FrozenBN(model):
        ...     _ = model.train()(torch.randn(8, 4))
        ...     frozen = model[1].training
        >>> frozen, model[1].running_mean.tolist()
        (False, [0.0, 0.0, 0.0])
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        with model_lock(model):
            self.layers = bn_layers(model)
            missing = untracked(self.layers)
            if missing:
                raise ValueError(
                    f"freeze_bn: BN layer(s) {missing} keep no running statistics (track_running_stats="
                    "False), so they would keep normalizing with batch statistics; give them population "
                    "statistics first with precise_bn or load_stats"
                )
            self._flags = [(layer.module, layer.module.training) for layer in self.layers]
            # a plain module-level hook, not observe_bn_inputs: it lives as long as the user's model
            # trains and must survive torch.save(model) and copy.deepcopy (it acts on the module called)
            self._hooks = [layer.module.register_forward_pre_hook(_force_eval) for layer in self.layers]
            for layer in self.layers:
                layer.module.train(False)

    def release(self) -> None:
        """Unfreeze: remove the hooks and put each BN layer's ``training`` flag back.

        Why: the handle outlives the ``with`` block when ``freeze_bn`` is used for the end of training.

        Args:
            None.

        Returns:
            None; calling it again does nothing more.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
            >>> handle = freeze_bn(model)
            >>> handle.release()
            >>> model[1].training
            True
        """
        with model_lock(self._model):
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
    """Freeze every BN layer to its population statistics, also while the model trains.

    Why: with small normalization batches, training the last part with population statistics
    removes the train-test inconsistency (Wu & Johnson 2021, Section 4).

    Args:
        model: the model; BN layers must keep running statistics.

    Returns:
        A ``FrozenBN`` handle: ``release()`` it (or use it in ``with``) to unfreeze.

    Raises:
        ValueError: BN layers without running statistics; named.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> handle = freeze_bn(model)
        >>> _ = model.train()(torch.randn(8, 4))  # BN normalizes with its buffers, which stay put
        >>> model[1].training, model[1].num_batches_tracked.item()
        (False, 0)
        >>> handle.release()
    """
    return FrozenBN(model)
