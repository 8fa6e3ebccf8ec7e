"""``collect_stats``: exact BN statistics per source and per layer, in one pass over the data."""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from shiftbn._log import bars_wanted
from shiftbn._torch import autocast, check_device, explained_errors
from shiftbn.bn import native
from shiftbn.bn.distributed import RankSync, plan_shard
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


def collect_stats(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 64,
    by_source: bool = True,
    num_samples: int | None = None,
    mode: CollectMode = "batch",
    sampler: Iterable[list[int]] | None = None,
    seed: int = 0,
    max_passes: int | None = None,
    tol: float = 1e-6,
    num_workers: int = 0,
    keys: ItemKeys | None = None,
    source_names: list[str] | tuple[str, ...] | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    fused: bool | None = None,
    cache_bytes: int = 1 << 30,
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = True,
) -> SourceStats:
    """Exact per-channel mean and population variance of every BN layer's input, per source.

    Why: BN statistics depend on which samples are normalized together; per-source statistics
    collected from single-source batches are what AdaBN, DSBN and the shift profile need.
    ``data``: a ``SourceTaggedDataset`` (batches of ``batch_size`` from one source each, one pass in
    total), a plain Dataset (one pooled source), or a re-iterable of batches ``x``/``(x, y)``/
    ``(x, y, s)`` (``s`` ids must be equal within a batch when ``by_source``).
    ``num_samples``: at most this many samples per source: a seeded random subset of a Dataset, else
    the first ones (also of a ``sampler``'s batches). Under ``torch.distributed`` the cap is global:
    rank r keeps at most ``num_samples // W`` (+1 for r < ``num_samples % W``) per source, so a rank
    holding fewer samples of a source than its share leaves the total below the cap. A Dataset that is
    the same on every rank (and ``sampler``'s batches, if given) is sharded here: rank r takes whole
    batches r, r + W, ... of the plan one process makes (without a sampler the cap applies before
    sharding, so the result equals one process's); a per-rank Dataset or sampler, or an iterable of
    batches (a DataLoader with a ``DistributedSampler``), is each rank's own shard (identical batches
    on every rank are refused).
    ``keys``: field names of dict batches (``ItemKeys(input="image", source="site")``; MONAI and
    Hugging Face style); ``source_names``: names of the integer source ids of batches (id ``s`` is
    ``source_names[s]``; default: the dataset's names, else the ids written as strings); ``num_workers``,
    ``pin_memory``, ``persistent_workers``: the DataLoader's.
    ``mode``: ``"batch"`` (BN normalizes with batch statistics, as PreciseBN), ``"sequential"``
    (inference-consistent fixpoint, see ``_fixpoint``), ``"eval"`` (stored statistics; refused for BN
    layers without running statistics). Modules other than BN run in eval mode. Every buffer, flag
    and momentum of the model is restored bit for bit afterwards; the model's lock is held
    throughout. An error on any rank is raised on every rank.
    Memory is O(layers x channels x sources) whatever the number of samples: each batch's exact
    moments are merged at once. ``fused``: on CPU, BN layers that take batch statistics run a C kernel
    (``bn.native``: float32 inputs; the exact float64 channel sums and BN's output in one call, built once
    per machine with the system C compiler) unless ``fused=False``; other inputs and devices take each
    batch's moments from one fused float64 kernel (``torch.compile``; exact to ~1e-14, a one-time compile
    of ~10 s) with ``True``, and for passes of at least 200 batches and once it is compiled in this
    process with ``None`` (default); ``False``: the eager two-pass float64 reduction everywhere.
    ``cache_bytes``: sequential mode keeps the batches a ``DataLoader`` loaded in its first pass for the
    later ones when all of them fit in this many bytes (default 1 GiB; 0: load them every pass).
    ``device``: where inputs go; must be the model's device (default: the model's; the model is
    never moved). ``amp``: forwards under autocast; statistics are still accumulated in float64 from
    the tensor each BN layer actually receives.
    Returns ``SourceStats`` (names: the dataset's source names, or ``"pooled"``).
    """
    with model_lock(model):
        sync = RankSync()
        shard, sampler = plan_shard(data, sampler, sync)
        layers, plan = sync.check(lambda: _prepare(model, data, batch_size, by_source, num_samples, mode,
                                                   sampler, seed, max_passes, num_workers, sync, device,
                                                   {"keys": keys, "source_names": source_names,
                                                    "pin_memory": pin_memory,
                                                    "persistent_workers": persistent_workers, "shard": shard}))
        budget = as_count(cache_bytes, "cache_bytes", 0)
        if mode == "sequential":
            plan = Replay(plan, budget)
        snap = ModelSnapshot(model, layers)
        try:
            first = "batch" if mode == "sequential" else mode
            fuse = _use_fused(fused, plan, device_of(model))
            native_ok = _use_native(fused, device_of(model))
            precision = partial(autocast, device_of(model), amp)
            probe = mode == "sequential"
            stats, infos = sync.merge(lambda: _one_pass(model, layers, plan, first, None, None, progress,
                                                        f"stats ({first})", fuse, precision=precision,
                                                        probe=probe, probe_data=sync.world > 1, native_ok=native_ok))
            _check_sharded(infos, sync.world)
            if not stats.sources:
                raise ValueError("no data reached the BN layers: data is empty"
                                 + (f" on all {sync.world} ranks" if sync.world > 1 else ""))
            if mode == "sequential":
                once = all(i["once"] for i in infos if i["samples"])
                if not once and any(i["truncated"] for i in infos):  # ranks disagree: measure every layer
                    stats, infos = sync.merge(lambda: _one_pass(model, layers, plan, first, None, None, progress,
                                                                f"stats ({first})", fuse, precision=precision,
                                                                probe_data=sync.world > 1, native_ok=native_ok))
                order = next((i["order"] for i in infos if i["order"]), [])
                stats = _fixpoint(model, layers, plan, stats, order, once, sync, max_passes, tol, progress, fuse,
                                  precision, native_ok)
            stats = _ordered(stats, plan.names)
            stats.mode = mode
            return stats
        finally:
            snap.restore()


def _prepare(model, data, batch_size, by_source, num_samples, mode, sampler, seed, max_passes, num_workers,
             sync: RankSync, device, loading: dict) -> tuple[list[BNLayer], Batches]:
    """Validate the arguments and plan this rank's batches."""
    check_device(model, device)
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


def _fixpoint(model, layers, plan, stats, order, once, sync, max_passes, tol, progress, fused,
              precision, native_ok: bool = False) -> SourceStats:
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
        new, _ = sync.merge(partial(_one_pass, model, layers, plan, "eval", stats, frontier, progress,
                                    f"stats (sequential {p})", fused, measure, precision,
                                    native_ok=native_ok))
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


class _NativeForward:
    """Batch-mode BN through ``bn.native`` for one module: stats and output in one kernel call.

    Installed as the module's instance ``forward`` for one pass and removed by ``remove`` (the class's
    forward shows again; nothing else of the module is touched). Inputs the kernel does not take
    (another dtype, device or layout), and truncated passes, go through the pre-hook logic and the
    module's own forward as before.
    """

    TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    @classmethod
    def fits(cls, module: nn.Module) -> bool:
        """Plain BatchNorm1d/2d/3d (subclasses may change forward) without an instance forward."""
        return type(module) in cls.TYPES and "forward" not in vars(module)

    def __init__(self, module: nn.Module, hook, begin, state: dict) -> None:
        self.module = module
        own = type(module).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (state["measure"] is None and native.accepts(x, module.weight, module.bias)
                    and x.shape[1] == module.num_features):
                module._check_input_dim(x)  # torch's own refusal of a 3-D input to BatchNorm2d, etc.
                return begin(x).add_native(x, module)
            hook(module, (x,))
            return own(module, x)

        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class _StopForwardSignal(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised in a pre-hook once the layer a truncated pass measures has seen its input."""


def _one_pass(model: nn.Module, layers: list[BNLayer], plan: Batches | Replay, mode: str,
              current: SourceStats | None, frontier: set[str] | None, progress: bool,
              desc: str, fused: bool = False, measure: str | None = None,
              precision=contextlib.nullcontext, probe: bool = False,
              probe_data: bool = False, native_ok: bool = False) -> tuple[SourceStats, dict[str, Any]]:
    """One pass over ``plan``: this rank's statistics, and an info dict (samples seen, fingerprint of
    the first batch, BN modules in first-call order, whether each was called once in the first
    forward, whether the pass truncated itself).

    Every mode runs the model in eval mode. In "batch" mode the pre-hook loads each batch's own exact
    statistics into the buffers before BN runs: BN then normalizes with batch statistics without
    computing them a second time, and the EMA is never updated. In "eval" mode with ``current``, the
    modules in ``frontier`` (all when ``None``) use ``current``'s statistics, the others batch mode.
    ``measure``: a truncated pass that records only that module's input and stops each forward there
    (every module before it must be in ``frontier`` and called once per forward). ``probe``: after the
    first forward, when every module was called once, measure only the first module called (the
    first pass of the sequential schedule, which needs no more). ``probe_data``: fingerprint the first
    batch (to spot unsharded data across ranks).
    """
    model.eval()
    accs: dict[str, dict[tuple[str, int], RunningMoments]] = {}
    n_samples: dict[str, int] = {}
    state: dict[str, Any] = {"source": None, "calls": {}, "measure": measure}
    order: dict[str, None] = {}
    workspace = Workspace()

    def make_hook(name: str, batch_stats: bool):
        def begin(x: torch.Tensor) -> RunningMoments | None:
            """Count the call; the accumulator for this input, or None where a truncated pass skips it."""
            k = state["calls"].get(name, 0)
            state["calls"][name] = k + 1
            order.setdefault(name)
            truncated = state["measure"]
            if truncated is not None and name != truncated:
                return None  # a truncated pass: this module uses its stored statistics
            if x.is_complex():  # its moments would keep the real part only
                raise TypeError(f"BN layer {name!r} received a complex input ({x.dtype}, source {state['source']!r}); "
                                "BN statistics are real-valued: feed real inputs (x.real, x.abs() or "
                                "torch.view_as_real(x))")
            if batch_stats and truncated is None and x.numel() == x.shape[1]:
                raise ValueError(
                    f"a batch of one sample (source {state['source']!r}) gives BN layer {name!r} one value per "
                    f"channel (input shape {tuple(x.shape)}): it cannot normalize with batch statistics (BN in "
                    "training refuses it too); use larger batches or drop that sample"
                )
            return accs.setdefault(state["source"], {}).setdefault((name, k), RunningMoments())

        def hook(module, args):
            x = args[0]
            acc = begin(x)
            if acc is None:
                return
            _, mean, var = acc.add(x, workspace, fused)
            if state["measure"] is not None:
                raise _StopForwardSignal
            if batch_stats and module.running_mean is not None:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)

        return hook, begin

    def uses_batch(name: str) -> bool:
        return mode == "batch" or (frontier is not None and name not in frontier)

    # a truncated pass hooks only the module it measures: the others run on PyTorch's hook-free path
    hooks: dict[str, Any] = {}

    def install() -> None:
        for layer in layers:
            if measure is not None and layer.name != measure:
                continue
            hook, begin = make_hook(layer.name, uses_batch(layer.name))
            if native_ok and measure is None and uses_batch(layer.name) and _NativeForward.fits(layer.module):
                hooks[layer.name] = _NativeForward(layer.module, hook, begin, state)
            else:
                hooks[layer.name] = layer.module.register_forward_pre_hook(hook)

    device = device_of(model)
    writes: dict[str, list] = {}
    written = None
    fingerprint = None
    cycles = cycle_positions(model)  # a truncated forward must not shift a CycleBatchNormList's position
    once = True
    try:
        install()
        with torch.no_grad():
            bar = tqdm(plan, total=plan.total, desc=desc, disable=not bars_wanted(progress), unit="batch",
                       mininterval=1.0)
            started = time.perf_counter()
            for x, src in bar:
                if len(x) == 0:
                    raise ValueError(f"an empty batch (0 samples, source {src!r}) reached collect_stats; "
                                     "drop empty batches from the data")
                first = not n_samples
                if first and probe_data:
                    fingerprint = _fingerprint(x)
                if current is not None and src != written:
                    # only the frontier's buffers must hold ``current``, and no hook writes them: once per source
                    if src not in writes:
                        writes[src] = prepare_writes(layers, current[src])
                    apply_writes(writes[src])
                    written = src
                state["source"], state["calls"] = src, {}
                with contextlib.suppress(_StopForwardSignal), precision(), explained_errors(model, x):
                    model(x.to(device) if isinstance(x, torch.Tensor) else x)
                set_positions(cycles)
                n_samples[src] = n_samples.get(src, 0) + len(x)
                if first and probe:
                    once = all(k == 1 for k in state["calls"].values())
                    if once and order:
                        state["measure"] = head = next(iter(order))
                        accs = {s: {key: acc for key, acc in per.items() if key[0] == head}
                                for s, per in accs.items()}
                        for name, h in hooks.items():
                            if name != head:
                                h.remove()
                if not bar.disable:
                    bar.set_postfix_str(f"{sum(n_samples.values()) / (time.perf_counter() - started):,.0f} samples/s",
                                        refresh=False)
    finally:
        for h in hooks.values():
            h.remove()
    _check_finite(accs, layers)
    info = {"samples": sum(n_samples.values()), "fingerprint": fingerprint, "order": list(order),
            "once": once, "truncated": probe and state["measure"] is not None}
    return SourceStats(_results(accs, n_samples, layers), mode), info


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
