"""``collect_stats``: exact BN statistics per source and per layer, in one pass over the data."""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from shiftbn._forward import PLAIN, Forward, Runner, check_forward
from shiftbn._log import bars_wanted
from shiftbn._torch import autocast, check_device, explained_errors
from shiftbn.bn import native
from shiftbn.bn.distributed import RankSync, plan_shard
from shiftbn.bn.hooks import BNInputHooks, observe_bn_inputs
from shiftbn.bn.layers import BNLayer, bn_layers, check_materialized, cycle_positions, device_of, set_positions
from shiftbn.bn.lock import model_lock
from shiftbn.bn.moments import BNStats, SourceStats, Workspace
from shiftbn.bn.plan import Batches, Replay, as_count, plan_batches, rank_share
from shiftbn.bn.reduce import RunningMoments, fused_ready
from shiftbn.bn.sites import site_key, split_site
from shiftbn.bn.state import ModelSnapshot, apply_writes, prepare_writes, untracked
from shiftbn.data.items import ItemKeys

COLLECT_MODES = ("batch", "sequential", "eval")
CollectMode = Literal["batch", "sequential", "eval"]


@dataclass(frozen=True)
class CollectOptions:
    """How ``collect_stats`` loads batches, which kernel takes their moments, and when sequential mode stops.

    Why: these settings tune speed, memory and the loader; ``collect_stats``'s own arguments say what
    is measured. The defaults suit most uses.

    Args:
        sampler: an iterable of index lists (e.g. ``SourceBatchSampler``) giving the batches of a
            Dataset instead of ``batch_size`` batches of one source each; ``num_samples`` keeps the first
            ones. A per-rank sampler is that rank's shard under ``torch.distributed``.
        num_workers: the DataLoader's worker processes (0: load in this process).
        keys: field names of dict batches (``ItemKeys(input="image", source="site")``; MONAI and
            Hugging Face style).
        source_names: names of the integer source ids of batches (id ``s`` is ``source_names[s]``;
            default: the dataset's names, else the ids written as strings).
        pin_memory: the DataLoader's ``pin_memory``.
        persistent_workers: the DataLoader's ``persistent_workers``.
        device: where inputs go; must be the model's device (default: the model's; the model is
            never moved).
        fused: on CPU, BN layers that take batch statistics run a C kernel (``bn.native``: float32
            inputs; the exact float64 channel sums and BN's output in one call, built once per machine
            with the system C compiler) unless ``False``; other inputs and devices take each batch's
            moments from one fused float64 kernel (``torch.compile``; exact to ~1e-14, a one-time
            compile of ~10 s) with ``True``, and for passes of at least 200 batches and once it is
            compiled in this process with ``None`` (default); ``False``: the eager two-pass float64
            reduction everywhere.
        cache_bytes: sequential mode keeps the batches a ``DataLoader`` loaded in its first pass for
            the later ones when all of them fit in this many bytes (default 1 GiB; 0: load them every
            pass).
        max_passes: sequential mode's passes after the first (default: number of BN modules + 32).
        tol: sequential mode's convergence threshold when a BN module is called more than once per
            forward (relative change, in normalized units).

    Returns:
        A frozen ``CollectOptions`` to pass as ``collect_stats(..., options=...)``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> opts = CollectOptions(sampler=sb.SourceBatchSampler(ds.source_ids, 20, mode="mixed"), fused=False)
        >>> stats = collect_stats(model, ds, by_source=False, options=opts, progress=False)
        >>> stats["pooled"].num_samples
        60
    """

    sampler: Iterable[list[int]] | None = None
    num_workers: int = 0
    keys: ItemKeys | None = None
    source_names: list[str] | tuple[str, ...] | None = None
    pin_memory: bool = False
    persistent_workers: bool = False
    device: str | torch.device | None = None
    fused: bool | None = None
    cache_bytes: int = 1 << 30
    max_passes: int | None = None
    tol: float = 1e-6


def collect_stats(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 64,
    by_source: bool = True,
    num_samples: int | None = None,
    mode: CollectMode = "batch",
    seed: int = 0,
    amp: bool = False,
    progress: bool = True,
    options: CollectOptions | None = None,
    forward: Forward | None = None,
    **legacy: Any,
) -> SourceStats:
    """Exact per-channel mean and population variance of every BN layer's input, per source.

    Why: BN statistics depend on which samples are normalized together; per-source statistics
    collected from single-source batches are what AdaBN, DSBN and the shift profile need.
    Every mode runs modules other than BN in eval mode. Every buffer, flag and momentum of the
    model is restored bit for bit afterwards; the model's lock is held throughout. An error on any
    rank is raised on every rank. Memory is O(layers x channels x sources) whatever the number of
    samples: each batch's exact moments are merged at once.

    Args:
        model: the model; its BN layers are found by ``bn_layers``.
        data: a ``SourceTaggedDataset`` (batches of ``batch_size`` from one source each, one pass in
            total), a plain Dataset (one pooled source), or a re-iterable of batches ``x``/``(x, y)``/
            ``(x, y, s)`` (``s`` ids must be equal within a batch when ``by_source``).
        batch_size: at most this many samples per batch of a Dataset, in near-equal batches (in
            ``"batch"`` mode BN normalizes each batch with its own statistics: part of what is measured).
        by_source: statistics per source (``False``: every sample in one ``"pooled"`` source).
        num_samples: at most this many samples per source: a seeded random subset of a Dataset, else
            the first ones (also of a sampler's batches). Under ``torch.distributed`` the cap is global:
            rank r keeps at most ``num_samples // W`` (+1 for r < ``num_samples % W``) per source, so a
            rank holding fewer samples of a source than its share leaves the total below the cap. A
            Dataset that is the same on every rank (and a sampler's batches, if given) is sharded here:
            rank r takes whole batches r, r + W, ... of the plan one process makes (without a sampler
            the cap applies before sharding, so the result equals one process's); a per-rank Dataset or
            sampler, or an iterable of batches (a DataLoader with a ``DistributedSampler``), is each
            rank's own shard (identical batches on every rank are refused).
        mode: ``"batch"`` (BN normalizes with batch statistics, as PreciseBN), ``"sequential"``
            (inference-consistent fixpoint, see ``_fixpoint``), ``"eval"`` (stored statistics; refused
            for BN layers without running statistics).
        seed: seeds the shuffle of each source's samples of a Dataset into batches (and so the
            ``num_samples`` subset).
        amp: forwards under autocast; statistics are still accumulated in float64 from the tensor
            each BN layer actually receives.
        progress: show a progress bar.
        options: loading, kernel and sequential-schedule settings (``CollectOptions``).
        forward: ``forward(model, x)`` run on each batch of inputs ``x`` (on the model's device) instead of
            ``model(x)``: multi-input models, sliding-window inference, micro-batches. Statistics stay
            exact per source whatever the forward does, because every call of a BN layer merges its
            input's moments; in ``"batch"`` mode each *model call* normalizes with its own statistics,
            so micro-batches set the normalization batch size (``"eval"`` and ``"sequential"`` give the
            same statistics as one call).
        **legacy: the ``CollectOptions`` fields as keywords (``sampler=``, ``fused=``, ...): still
            accepted, with a ``DeprecationWarning``; they override ``options``.

    Returns:
        ``SourceStats`` (names: the dataset's source names, or ``"pooled"``).

    Raises:
        ValueError: a bad argument, no data reaching the BN layers, a batch of one sample in batch
            mode, or ``mode="eval"`` on layers without running statistics.
        FloatingPointError: NaN or Inf in a BN layer's input (the shallowest one is named).

    Example:
        >>> ds = sb.load("blobs-labs", n=60, n_features=4)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        >>> stats = collect_stats(model, ds, batch_size=16, mode="sequential", progress=False)
        >>> stats["lab_0"]["1"].mean.shape, stats["lab_0"].num_samples == len(ds.indices_of("lab_0"))
        ((8,), True)
    """
    opts = _options(options, legacy)
    with model_lock(model):
        sync = RankSync()
        shard, sampler = plan_shard(data, opts.sampler, sync)
        layers, plan = sync.check(lambda: _prepare(model, data, batch_size, by_source, num_samples, mode, seed,
                                                   opts, sampler, shard, sync))
        budget = as_count(opts.cache_bytes, "cache_bytes", 0)
        if mode == "sequential":
            plan = Replay(plan, budget)
        snap = ModelSnapshot(model, layers)
        try:
            device = device_of(model)
            job = _Job(model, layers, plan, sync, progress, fused=_use_fused(opts.fused, plan, device),
                       native=_use_native(opts.fused, device), precision=partial(autocast, device, amp),
                       runner=Runner(forward=check_forward(forward)))
            first = "batch" if mode == "sequential" else mode
            spec = _PassSpec(f"stats ({first})", first, fingerprint=sync.world > 1)
            # a user's forward may call the model several times per batch (micro-batches, windows): a forward
            # stopped after one module's input would measure only its first call, so no pass is truncated
            truncate = mode == "sequential" and forward is None
            stats, infos = sync.merge(lambda: _one_pass(job, replace(spec, probe=truncate)))
            _check_sharded(infos, sync.world)
            if not stats.sources:
                why = "data is empty" if forward is None else "the data is empty, or the forward never called the model"
                raise ValueError(f"no data reached the BN layers: {why}"
                                 + (f" on all {sync.world} ranks" if sync.world > 1 else ""))
            if mode == "sequential":
                once = truncate and all(i["once"] for i in infos if i["samples"])
                if not once and any(i["truncated"] for i in infos):  # ranks disagree: measure every layer
                    stats, infos = sync.merge(lambda: _one_pass(job, spec))
                order = next((i["order"] for i in infos if i["order"]), [])
                stats = _fixpoint(job, stats, order, once, opts.max_passes, opts.tol)
            stats = _ordered(stats, plan.names)
            stats.mode = mode
            return stats
        finally:
            snap.restore()


_OPTION_NAMES = tuple(f.name for f in fields(CollectOptions))


def _options(options: CollectOptions | None, legacy: dict[str, Any]) -> CollectOptions:
    """``options`` with the deprecated keyword spelling of its fields applied (one warning per call)."""
    if options is not None and not isinstance(options, CollectOptions):
        raise TypeError(f"options must be a CollectOptions, got {type(options).__name__}")
    unknown = [k for k in legacy if k not in _OPTION_NAMES]
    if unknown:
        raise TypeError(f"collect_stats() got an unexpected keyword argument {unknown[0]!r}")
    options = CollectOptions() if options is None else options
    if legacy:
        spelled = ", ".join(f"{k}=..." for k in legacy)
        warnings.warn(f"collect_stats({spelled}) is deprecated; pass options=CollectOptions({spelled})",
                      DeprecationWarning, stacklevel=3)
        options = replace(options, **legacy)
    return options


def _prepare(model, data, batch_size, by_source, num_samples, mode, seed, opts: CollectOptions, sampler, shard: bool,
             sync: RankSync) -> tuple[list[BNLayer], Batches]:
    """Validate the arguments and plan this rank's batches (``sampler``: ``opts.sampler`` as sharded here)."""
    max_passes, num_workers = opts.max_passes, opts.num_workers
    loading = {"keys": opts.keys, "source_names": opts.source_names, "pin_memory": opts.pin_memory,
               "persistent_workers": opts.persistent_workers, "shard": shard}
    check_device(model, opts.device)
    if mode not in COLLECT_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {COLLECT_MODES}")
    batch_size = as_count(batch_size, "batch_size", 1)
    if num_samples is not None:
        num_samples = as_count(num_samples, "num_samples", 1)
    if max_passes is not None:
        as_count(max_passes, "max_passes", 1)
    layers = bn_layers(model)
    check_materialized(layers)
    if mode == "eval" and untracked(layers):
        raise ValueError(
            f"mode='eval' observes the model with its stored statistics, but BN layer(s) {untracked(layers)} "
            "keep none (track_running_stats=False) and would normalize with batch statistics; use "
            "mode='batch' or 'sequential', or load statistics first (load_stats, precise_bn)"
        )
    # a Dataset the same on every rank is planned as by one process (global cap), then shared out
    cap = num_samples if loading["shard"] and sampler is None else rank_share(num_samples, sync.world, sync.rank)
    return layers, plan_batches(data, batch_size, by_source, cap, sampler, seed, num_workers,
                         min_batch=1 if mode == "eval" else 2, **loading)


FUSED_MIN_BATCHES = 200


def _use_fused(fused: bool | None, plan: Batches | Replay, device: torch.device) -> bool:
    """Whether to take batch moments from the fused kernel: always, never, or for long passes and
    whenever it is already compiled for this device (then it costs no wait)."""
    if fused is not None:
        return bool(fused)
    return fused_ready(device) or (plan.total is not None and plan.total >= FUSED_MIN_BATCHES)


def _use_native(fused: bool | None, device: torch.device) -> bool:
    """Whether BN layers taking batch statistics run the C kernel (``bn.native``): on CPU unless
    ``fused=False`` (the eager float64 reference path), where the kernel builds (once per machine)."""
    return fused is not False and device.type == "cpu" and native.available()


def _fingerprint(x: Any) -> str | None:
    """A cheap digest of a batch's first MiB of bytes (to spot identical data on every rank)."""
    if not isinstance(x, torch.Tensor):
        return None
    raw = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8)[: 1 << 20]
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def _check_sharded(infos: list[dict], world: int) -> None:
    """Refuse the same unsharded data on every rank: each rank would count every sample again."""
    if world == 1:
        return
    counts = {i["samples"] for i in infos}
    prints = {i["fingerprint"] for i in infos}
    if len(counts) == 1 and counts != {0} and len(prints) == 1 and None not in prints:
        raise ValueError(
            f"every one of the {world} ranks got the same {counts.pop()} samples (identical first batch): the "
            f"data is not sharded, and merging would count each sample {world} times; give each rank its "
            "own shard, e.g. sampler=SourceBatchSampler(..., num_replicas=world_size, rank=rank) or a "
            "DataLoader with a DistributedSampler"
        )


def _ordered(stats: SourceStats, names: list[str] | None) -> SourceStats:
    """Sources in the dataset's order (else by name), whichever rank saw them first."""
    rank = {n: i for i, n in enumerate(names or [])}
    keys = sorted(stats.sources, key=lambda s: (rank.get(s, len(rank)), s))
    return SourceStats({k: stats.sources[k] for k in keys}, stats.mode, stats.passes)


def _fixpoint(job: _Job, stats: SourceStats, order: list[str], once: bool, max_passes: int | None,
              tol: float) -> SourceStats:
    """Passes until the statistics reproduce themselves when every BN layer uses its stored ones.

    How: in pass p >= 2 the first p - 1 BN modules in call order (``order``) use their stored
    statistics and the rest normalize with batch statistics (as in batch mode), so no layer ever
    normalizes with statistics that are stale for its input (they blow up with depth). Module j's input
    depends only on modules called before it, so pass j + 1 measures it exactly.
    When every module is called once per forward (``once``, seen in pass 1's first forward), pass 1
    measures only the first module and pass p only module p - 1, each forward stopping there: the
    statistics are exact by construction after pass L, so L passes cost about (L + 1) / 2 forwards and
    no confirming pass is needed. Modules called more than once (cycles through a shared module) run
    full passes until the change is below ``tol`` (relative, in normalized units; raised to 64 eps of
    the buffers' dtype, the precision they are stored with). Default ``max_passes`` (passes after the
    first): L + 32 (L to build the frontier, room for such loops).
    """
    layers = job.layers
    limit = len(layers) + 32 if max_passes is None else max_passes
    tol = max(tol, 64 * max(float(torch.finfo(_buffer_dtype(layer)).eps) for layer in layers))
    eps = {layer.name: float(layer.module.eps) for layer in layers}
    order = list(order) + [layer.name for layer in layers if layer.name not in order]
    worst = (float("inf"), "?", "?")
    frontier: set[str] = set()
    if once and len(order) <= 1:
        return stats
    for p in range(2, limit + 2):
        frontier = set(order[: p - 1])
        measure = order[p - 1] if once else None
        spec = _PassSpec(f"stats (sequential {p})", "eval", current=stats, frontier=frontier, measure=measure)
        new, _ = job.sync.merge(partial(_one_pass, job, spec))
        new.passes = p
        if once:  # a truncated pass: only that module's statistics are new, and exact
            stats = SourceStats({src: BNStats({**bn.layers, **(new.sources[src].layers if src in new.sources
                                                              else {})}, bn.num_samples)
                                 for src, bn in stats.items()}, stats.mode, p)
            if p == len(order):
                return stats
            continue
        worst = _max_change(stats, new, eps)
        stats = new
        if len(frontier) == len(order) and worst[0] <= tol:
            return stats
    if len(frontier) < len(order):
        left = len(frontier) + 1 if once else len(frontier)
        detail = (f"layer {order[left]!r} and the {len(order) - left - 1} BN module(s) called after it were "
                  f"never measured with final statistics upstream ({len(order)} modules need max_passes >= "
                  f"{len(order) - 1 if once else len(order)})")
    else:
        detail = (f"layer {worst[1]!r} (source {worst[2]!r}) still changed by {worst[0]:.2e} (relative, "
                  f"normalized units) > tol {tol:.1e}")
    warnings.warn(f"sequential statistics did not converge in {limit} passes: {detail}; raise max_passes "
                  "(passes after the first, batch-mode one) or tol",
                  stacklevel=3)
    return stats


def _buffer_dtype(layer: BNLayer) -> torch.dtype:
    m = layer.module
    return m.running_mean.dtype if m.running_mean is not None else torch.float32


def _max_change(old: SourceStats, new: SourceStats, eps: dict[str, float]) -> tuple[float, str, str]:
    """Largest change (value, layer, source) of a mean or variance, in units of the normalizer.

    |d mean| / sqrt(var + eps) and |d var| / (var + eps): the change as BN's output would see it.
    """
    worst = (0.0, "", "")
    for src, bn in new.items():
        for name, m in bn.layers.items():
            o = old.sources[src].layers.get(name) if src in old.sources else None
            if o is None:
                return float("inf"), name, src
            e = eps.get(split_site(name)[0], 1e-5)
            scale = m.var + e
            change = max(float(np.max(np.abs(m.mean - o.mean) / np.sqrt(scale))),
                         float(np.max(np.abs(m.var - o.var) / scale)))
            if change > worst[0] or not np.isfinite(change):
                worst = (change, name, src)
    return worst


@dataclass(frozen=True)
class _Job:
    """What every pass of one ``collect_stats`` call shares."""

    model: nn.Module
    layers: list[BNLayer]
    plan: Batches | Replay
    sync: RankSync
    progress: bool
    fused: bool  # batch moments from the fused torch.compile kernel (``_use_fused``)
    native: bool  # batch-mode BN through the C kernel (``_use_native``)
    precision: Callable[[], contextlib.AbstractContextManager]  # autocast or not
    runner: Runner = PLAIN  # the user's forward(model, x)


@dataclass(frozen=True)
class _PassSpec:
    """What one pass does.

    ``mode``: ``"batch"`` (every BN module normalizes with its batch statistics) or ``"eval"`` (the
    modules in ``frontier`` use ``current``'s statistics, all when ``frontier`` is ``None``; the others
    batch statistics). ``measure``: a truncated pass that records only that module's input and stops
    each forward there (every module before it must be in ``frontier`` and called once per forward).
    ``probe``: after the first forward, when every module was called once, measure only the first
    module called (the first pass of the sequential schedule, which needs no more). ``fingerprint``:
    digest the first batch (to spot unsharded data across ranks).
    """

    desc: str
    mode: str = "batch"
    current: SourceStats | None = None
    frontier: set[str] | None = None
    measure: str | None = None
    probe: bool = False
    fingerprint: bool = False

    def uses_batch(self, name: str) -> bool:
        """Whether BN module ``name`` normalizes with the statistics of its own batch."""
        return self.mode == "batch" or (self.frontier is not None and name not in self.frontier)


class _Recorder:
    """The BN-input handler of one pass: each call's exact moments, per source and call site.

    In batch statistics mode it also loads the batch's own exact statistics into the (eval-mode)
    module's buffers before BN runs: BN then normalizes with batch statistics without computing them a
    second time, and the EMA is never updated. A module with a ``_NativeForward`` leaves both to the C
    kernel: the accumulator waits in ``pending`` for the module's forward.
    """

    def __init__(self, spec: _PassSpec, fused: bool, natives: dict[str, _NativeForward]) -> None:
        self.spec = spec
        self.fused = fused
        self.natives = natives
        self.measure = spec.measure
        self.source: str | None = None
        self.accs: dict[str, dict[tuple[str, int], RunningMoments]] = {}
        self.n_samples: dict[str, int] = {}
        self.pending: dict[str, RunningMoments] = {}
        self.workspace = Workspace()

    def on_input(self, layer: BNLayer, k: int, x: torch.Tensor) -> None:
        name, module = layer.name, layer.module
        if self.measure is not None and name != self.measure:
            return  # a truncated pass: this module uses its stored statistics
        if x.is_complex():  # its moments would keep the real part only
            raise TypeError(f"BN layer {name!r} received a complex input ({x.dtype}, source {self.source!r}); "
                            "BN statistics are real-valued: feed real inputs (x.real, x.abs() or "
                            "torch.view_as_real(x))")
        batch_stats = self.spec.uses_batch(name)
        kernel = name in self.natives and self.measure is None and self.natives[name].takes(x)
        if kernel:
            module._check_input_dim(x)  # torch's own refusal of a 3-D input to BatchNorm2d, etc.
        if batch_stats and self.measure is None and x.numel() == x.shape[1]:
            raise ValueError(
                f"a batch of one sample (source {self.source!r}) gives BN layer {name!r} one value per "
                f"channel (input shape {tuple(x.shape)}): it cannot normalize with batch statistics (BN in "
                "training refuses it too); use larger batches or drop that sample"
            )
        acc = self.accs.setdefault(self.source, {}).setdefault((name, k), RunningMoments())
        if kernel:
            self.pending[name] = acc
            return
        _, mean, var = acc.add(x, self.workspace, self.fused)
        if self.measure is None and batch_stats and module.running_mean is not None:
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)

    def truncate(self, head: str) -> None:
        """From now on measure only module ``head`` (its accumulators kept, the others dropped)."""
        self.measure = head
        self.accs = {s: {key: acc for key, acc in per.items() if key[0] == head} for s, per in self.accs.items()}


class _NativeForward:
    """Batch-mode BN through ``bn.native`` for one module: stats and output in one kernel call.

    Installed as the module's instance ``forward`` for one pass and removed by ``remove`` (the class's
    forward shows again; nothing else of the module is touched). It runs the kernel when the pass's
    pre-hook left an accumulator for this call in ``pending``; other inputs (another dtype, device or
    layout) and truncated passes go through the module's own forward.
    """

    TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    @classmethod
    def fits(cls, module: nn.Module) -> bool:
        """Plain BatchNorm1d/2d/3d (subclasses may change forward) without an instance forward."""
        return type(module) in cls.TYPES and "forward" not in vars(module)

    def __init__(self, name: str, module: nn.Module, pending: dict[str, RunningMoments]) -> None:
        self.module = module
        own = type(module).forward

        def forward(input: torch.Tensor) -> torch.Tensor:  # torch's parameter name: bn(input=x) works too
            acc = pending.pop(name, None)
            return own(module, input) if acc is None else acc.add_native(input, module)

        module.forward = forward

    def takes(self, x: torch.Tensor) -> bool:
        """Whether the kernel takes this input."""
        m = self.module
        return native.accepts(x, m.weight, m.bias) and x.shape[1] == m.num_features

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _one_pass(job: _Job, spec: _PassSpec) -> tuple[SourceStats, dict[str, Any]]:
    """One pass over ``job.plan`` as ``spec`` says: this rank's statistics, and an info dict (samples
    seen, fingerprint of the first batch, BN modules in first-call order, whether each was called once
    in the first forward, whether the pass truncated itself).

    Every mode runs the model in eval mode; a truncated pass hooks only the module it measures (the
    others run on PyTorch's hook-free path).
    """
    job.model.eval()
    natives: dict[str, _NativeForward] = {}
    rec = _Recorder(spec, job.fused, natives)
    hooked = [layer for layer in job.layers if spec.measure is None or layer.name == spec.measure]
    try:
        with observe_bn_inputs(job.model, hooked, rec.on_input, stop_after=spec.measure) as hooks:
            if job.native and spec.measure is None:
                for layer in hooked:
                    if spec.uses_batch(layer.name) and _NativeForward.fits(layer.module):
                        natives[layer.name] = _NativeForward(layer.name, layer.module, rec.pending)
            with torch.no_grad():
                info = _feed(job, spec, rec, hooks)
    finally:
        for forward in natives.values():
            forward.remove()
    _check_finite(rec.accs, job.layers)
    info["truncated"] = spec.probe and rec.measure is not None
    return SourceStats(_results(rec.accs, rec.n_samples, job.layers), spec.mode), info


def _feed(job: _Job, spec: _PassSpec, rec: _Recorder, hooks: BNInputHooks) -> dict[str, Any]:
    """Every batch of the plan through the model, with ``spec.current``'s statistics in the frontier's
    buffers (written once per source: no hook writes them); the pass's info (see ``_one_pass``)."""
    device = device_of(job.model)
    writes: dict[str, list] = {}
    written = None
    fingerprint = None
    cycles = cycle_positions(job.model)  # a truncated forward must not shift a CycleBatchNormList's position
    once = True
    bar = tqdm(job.plan, total=job.plan.total, desc=spec.desc, disable=not bars_wanted(job.progress), unit="batch",
               mininterval=1.0)
    started = time.perf_counter()
    for x, src in bar:
        if len(x) == 0:
            raise ValueError(f"an empty batch (0 samples, source {src!r}) reached collect_stats; "
                             "drop empty batches from the data")
        first = not rec.n_samples
        if first and spec.fingerprint:
            fingerprint = _fingerprint(x)
        if spec.current is not None and src != written:
            if src not in writes:
                writes[src] = prepare_writes(job.layers, spec.current[src])
            apply_writes(writes[src])
            written = src
        rec.source = src
        with job.precision(), explained_errors(job.model, x):
            hooks.call(lambda x=x: job.runner.run(job.model, x, device))
        set_positions(cycles)
        rec.n_samples[src] = rec.n_samples.get(src, 0) + len(x)
        if first and spec.probe:
            once = all(k == 1 for k in hooks.calls.values())
            if once and hooks.order:
                _measure_only_first(rec, hooks)
        if not bar.disable:
            bar.set_postfix_str(f"{sum(rec.n_samples.values()) / (time.perf_counter() - started):,.0f} samples/s",
                                refresh=False)
    return {"samples": sum(rec.n_samples.values()), "fingerprint": fingerprint, "order": hooks.order, "once": once}


def _measure_only_first(rec: _Recorder, hooks: BNInputHooks) -> None:
    """Truncate the rest of the pass to the first module called: each forward stops after its input."""
    head = hooks.order[0]
    rec.truncate(head)
    hooks.stop_after = head
    for name in hooks.observed:
        if name != head:
            hooks.release(name)
    for name in [name for name in rec.natives if name != head]:
        rec.natives.pop(name).remove()


def _check_finite(accs: dict, layers: list[BNLayer]) -> None:
    """One NaN/Inf check per pass: name the shallowest layer (and its source) whose input held one."""
    depth = {layer.name: layer.depth for layer in layers}
    bad = [(depth[name], k, name, src) for src, per in accs.items() for (name, k), acc in per.items()
           if not acc.finite()]
    if bad:
        _, _, name, src = min(bad, key=lambda b: (b[0], b[1]))
        raise FloatingPointError(f"NaN or Inf in the input of BN layer {name!r} (source {src!r}); check the data "
                                 "and the layers before it")


def _results(accs: dict, n_samples: dict[str, int], layers: list[BNLayer]) -> dict[str, BNStats]:
    """Per source: merged moments per layer, plus ``site_key`` entries for modules called repeatedly."""
    depth = {layer.name: layer.depth for layer in layers}
    out = {}
    for src, per in accs.items():
        sites = sorted(per, key=lambda nk: (depth[nk[0]], nk[1]))
        reused = {name for name, k in sites if k > 0}
        result: dict = {}
        for name, k in sites:
            mom = per[(name, k)].result()
            if name in reused:
                result[site_key(name, k)] = mom
                result[name] = result[name].merge(mom) if name in result else mom
            else:
                result[name] = mom
        out[src] = BNStats(result, n_samples.get(src, 0))
    return out
