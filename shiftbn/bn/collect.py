"""``collect_stats``: exact BN statistics per source and per layer, in one pass over the data."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from shiftbn.bn.distributed import all_merge
from shiftbn.bn.layers import BNLayer, bn_layers, check_materialized, device_of
from shiftbn.bn.moments import POOLED, BNStats, MomentAccumulator, SourceStats, Workspace, batch_moments
from shiftbn.bn.sites import site_key
from shiftbn.bn.state import ModelSnapshot, write_stats
from shiftbn.data.tagged import SourceTaggedDataset

COLLECT_MODES = ("batch", "sequential", "eval")


class _Batches:
    """A re-iterable plan of input batches, each tagged with its source name."""

    def __init__(self, loader: Iterable[Any], names: list[str] | None, by_source: bool,
                 cap: int | None, total: int | None) -> None:
        self.loader, self.names, self.by_source, self.cap, self.total = loader, names, by_source, cap, total

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        seen: dict[str, int] = {}
        for batch in self.loader:
            x, s = _split_batch(batch)
            src = self._source_of(s) if self.by_source else POOLED
            if self.cap is not None:  # iterables: keep the first `cap` samples per source
                room = self.cap - seen.get(src, 0)
                if room <= 0:
                    continue
                if len(x) > room:
                    x = x[:room]
                seen[src] = seen.get(src, 0) + len(x)
            yield x, src

    def _source_of(self, s: Any) -> str:
        if s is None:
            return POOLED
        ids = torch.as_tensor(s).reshape(-1).unique()
        if len(ids) != 1:
            raise ValueError(
                "by_source=True needs single-source batches (statistics of a source are those seen in "
                "batches of that source alone); pass a SourceTaggedDataset, a single-source sampler, "
                "or by_source=False"
            )
        i = int(ids[0])
        return self.names[i] if self.names is not None else str(i)


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[2] if len(batch) >= 3 else None
    raise TypeError(f"a batch must be a tensor x or a tuple (x, y[, source]); got {type(batch).__name__}")


def _plan(data: Any, batch_size: int, by_source: bool, num_samples: int | None,
          sampler: Iterable[list[int]] | None, seed: int, num_workers: int) -> _Batches:
    rng = np.random.default_rng(seed)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        tagged = isinstance(data, SourceTaggedDataset)
        if sampler is not None:
            batches = [list(b) for b in sampler]
        else:
            if tagged and by_source:
                groups = [np.flatnonzero(data.source_ids == i) for i in np.unique(data.source_ids)]
            else:
                groups = [np.arange(len(data))]
            batches = []
            for g in groups:
                g = rng.permutation(g)
                if num_samples is not None:
                    g = g[:num_samples]
                # near-equal chunks (sizes differ by one) so no tail batch of a single sample
                batches += [c.tolist() for c in np.array_split(g, max(1, -(-len(g) // batch_size)))]
        names = list(data.source_names) if tagged else None
        loader = DataLoader(data, batch_sampler=batches, num_workers=num_workers)
        return _Batches(loader, names, by_source and tagged, None, len(batches))
    if isinstance(data, Iterator):
        raise TypeError("data is a one-shot iterator; pass a re-iterable (a DataLoader, a list of batches)")
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a Dataset or an iterable of batches, got {type(data).__name__}")
    base = getattr(data, "dataset", None)
    names = list(base.source_names) if isinstance(base, SourceTaggedDataset) else None
    total = len(data) if hasattr(data, "__len__") else None
    return _Batches(data, names, by_source, num_samples, total)


def collect_stats(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 64,
    by_source: bool = True,
    num_samples: int | None = None,
    mode: str = "batch",
    sampler: Iterable[list[int]] | None = None,
    seed: int = 0,
    max_passes: int | None = None,
    tol: float = 1e-6,
    num_workers: int = 0,
    progress: bool = True,
) -> SourceStats:
    """Exact per-channel mean and population variance of every BN layer's input, per source.

    Why: BN statistics depend on which samples are normalized together; per-source statistics
    collected from single-source batches are what AdaBN, DSBN and the shift profile need.
    ``data``: a ``SourceTaggedDataset`` (batches of ``batch_size`` from one source each, one pass in
    total), a plain Dataset (one pooled source), or a re-iterable of batches ``x``/``(x, y)``/
    ``(x, y, s)`` (``s`` ids must be equal within a batch when ``by_source``).
    ``num_samples``: at most this many samples per source (a seeded random subset; the first ones
    for iterables). ``mode``: ``"batch"`` (BN normalizes with batch statistics, as PreciseBN),
    ``"sequential"`` (inference-consistent fixpoint, see README), ``"eval"`` (stored statistics).
    Modules other than BN run in eval mode. The model is restored bit for bit afterwards.
    Returns ``SourceStats`` (names: the dataset's source names, or ``"pooled"``).
    """
    if mode not in COLLECT_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {COLLECT_MODES}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
    layers = bn_layers(model)
    check_materialized(layers)
    plan = _plan(data, batch_size, by_source, num_samples, sampler, seed, num_workers)
    snap = ModelSnapshot(model, layers)
    try:
        first = "batch" if mode == "sequential" else mode
        stats = all_merge(_one_pass(model, layers, plan, first, None, progress, f"stats ({first})"))
        if mode == "sequential":
            stats = _fixpoint(model, layers, plan, stats, max_passes, tol, progress)
        stats.mode = mode
        return stats
    finally:
        snap.restore()


def _fixpoint(model, layers, plan, stats, max_passes, tol, progress) -> SourceStats:
    """Iterate eval-mode passes until the statistics reproduce themselves.

    After pass p every layer with at most p BN layers upstream is exact, so a network whose BN
    layers are L deep converges in at most L passes plus one that confirms it.
    """
    limit = len(layers) + 1 if max_passes is None else max_passes
    for p in range(1, limit + 1):
        new = all_merge(_one_pass(model, layers, plan, "eval", stats, progress, f"stats (sequential {p})"))
        change = _max_change(stats, new)
        stats = new
        stats.passes = p + 1
        if change <= tol:
            return stats
    warnings.warn(f"sequential statistics did not converge in {limit} passes (last change {change:.2e})",
                  stacklevel=3)
    return stats


def _max_change(old: SourceStats, new: SourceStats) -> float:
    worst = 0.0
    for src, bn in new.items():
        for name, m in bn.layers.items():
            o = old[src].layers.get(name)
            if o is None:
                return float("inf")
            scale = np.sqrt(m.var) + 1e-12
            worst = max(worst, float(np.max(np.abs(m.mean - o.mean) / scale)),
                        float(np.max(np.abs(m.var - o.var) / (m.var + 1e-12))))
    return worst


def _one_pass(model: nn.Module, layers: list[BNLayer], plan: _Batches, mode: str,
              current: SourceStats | None, progress: bool, desc: str) -> SourceStats:
    # Every mode runs the model in eval mode. In "batch" mode the pre-hook loads each batch's own
    # exact statistics into the buffers before BN runs: BN then normalizes with batch statistics
    # without computing them a second time, and the EMA is never updated.
    model.eval()
    accs: dict[str, dict[tuple[str, int], MomentAccumulator]] = {}
    n_samples: dict[str, int] = {}
    state: dict[str, Any] = {"source": None, "calls": {}}
    workspace = Workspace()

    def make_hook(name: str):
        def hook(module, args):
            k = state["calls"].get(name, 0)
            state["calls"][name] = k + 1
            count, mean, m2 = batch_moments(args[0], workspace)
            if not torch.isfinite(mean.sum() + m2.sum()):  # one check (and sync) per call
                raise FloatingPointError(
                    f"NaN or Inf in the input of BN layer {name!r} (source {state['source']!r})"
                )
            accs.setdefault(state["source"], {}).setdefault((name, k), MomentAccumulator()).add(count, mean, m2)
            if mode == "batch" and module.running_mean is not None:
                module.running_mean.copy_(mean)
                module.running_var.copy_(m2 / count)

        return hook

    hooks = [layer.module.register_forward_pre_hook(make_hook(layer.name)) for layer in layers]
    device = device_of(model)
    try:
        with torch.no_grad():
            for x, src in tqdm(plan, total=plan.total, desc=desc, disable=not progress, leave=False):
                if mode == "batch" and len(x) < 2:
                    raise ValueError(
                        f"a batch of one sample (source {src!r}) cannot be normalized in mode='batch'; "
                        "use larger batches or drop that sample"
                    )
                if current is not None:
                    write_stats(layers, current[src])
                state["source"], state["calls"] = src, {}
                model(x.to(device) if isinstance(x, torch.Tensor) else x)
                n_samples[src] = n_samples.get(src, 0) + len(x)
    finally:
        for h in hooks:
            h.remove()
    if not accs:
        raise ValueError("no data reached the BN layers: data is empty")
    order = {layer.name: layer.depth for layer in layers}
    rank = {n: i for i, n in enumerate(plan.names or [])}
    out = {}
    for src in sorted(accs, key=lambda s: (rank.get(s, len(rank)), s)):
        per = accs[src]
        sites = sorted(per, key=lambda nk: (order[nk[0]], nk[1]))
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
    return SourceStats(out, mode)
