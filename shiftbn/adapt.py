"""Test-time recalibration strategies: which BN statistics (or adaptation) to evaluate a source with.

A strategy is a small object with a ``name`` (its spec string, e.g. ``"prior:16"``) and two
methods. ``stats_source(ctx, j)`` labels the statistics it uses on eval source ``j``; when
``shares_logits`` is true, strategies with the same label on ``j`` produce the same logits and the
matrix computes them once. ``logits(ctx, j, x)`` returns (N, K) outputs for the inputs ``x`` of
source ``j``, never leaving ``ctx.model`` changed (through ``use_stats``, ``preserved`` or a copy).
Register your own with ``register_strategy(prefix, factory)``: ``factory(arg)`` receives the text
after ``prefix:`` (or ``None``) and returns such an object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shiftbn.bn import BNStats, SourceStats, bn_layers, buffer_stats, device_of, mix_stats, preserved, use_stats
from shiftbn.data.tagged import SourceTaggedDataset


@dataclass
class AdaptContext:
    """What strategies may see: the model, per-source calibration statistics and unlabeled inputs.

    ``stats``: statistics of each source's calibration samples; ``calibration_inputs(j)`` and
    ``eval_inputs(j)``: input tensors (N, ...) of source ``j``; ``train_sources``: the sources the
    model was trained on; ``precise_stats()``: PreciseBN statistics of their calibration data in
    random (mixed-source) batches, computed on first use; ``eval_sources``: the sources evaluated
    (default: all with statistics); ``batch_size``: evaluation batch size.
    """

    model: nn.Module
    stats: SourceStats
    calibration_inputs: Callable[[str], torch.Tensor]
    eval_inputs: Callable[[str], torch.Tensor]
    train_sources: list[str]
    batch_size: int = 256
    seed: int = 0
    precise_stats: Callable[[], BNStats] | None = None
    eval_sources: list[str] | None = None
    _cache: dict = field(default_factory=dict)

    def source_stats(self, name: str) -> BNStats:
        if name not in self.stats:
            raise ValueError(f"no calibration statistics for source {name!r}; it has no calibration samples")
        return self.stats[name]


@torch.no_grad()
def forward_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``x`` in batches of ``batch_size`` with the model as it is; float32 on CPU."""
    device = device_of(model)
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def batch_stats_logits(model: nn.Module, x: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """Logits with every BN layer normalizing each batch by its own statistics (prediction-time BN).

    Samples are shuffled with ``seed`` into near-equal batches of at most ``batch_size`` (never one
    sample alone when avoidable); logits come back in the original order. Model state is restored.
    """
    if len(x) < 2:
        raise ValueError("prediction-time batch statistics need at least 2 samples")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    chunks = torch.tensor_split(order, max(1, -(-len(x) // batch_size)))
    with preserved(model):
        model.eval()
        for layer in bn_layers(model):
            layer.module.train()
        parts = [forward_batches(model, x[idx], len(idx)) for idx in chunks]
        out = torch.empty((len(x), *parts[0].shape[1:]))
        for idx, p in zip(chunks, parts, strict=True):
            out[idx] = p
    return out


class Strategy:
    """Base: evaluate with fixed BN statistics ``bn_stats(ctx, j)`` (``None`` = the model's own)."""

    name = "strategy"
    shares_logits = True

    def stats_source(self, ctx: AdaptContext, eval_source: str) -> str:
        raise NotImplementedError

    def bn_stats(self, ctx: AdaptContext, eval_source: str) -> BNStats | None:
        raise NotImplementedError

    def logits(self, ctx: AdaptContext, eval_source: str, x: torch.Tensor) -> torch.Tensor:
        stats = self.bn_stats(ctx, eval_source)
        if stats is None:
            with preserved(ctx.model):
                ctx.model.eval()
                return forward_batches(ctx.model, x, ctx.batch_size)
        with use_stats(ctx.model, stats):
            return forward_batches(ctx.model, x, ctx.batch_size)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


class SourceEMA(Strategy):
    """``source``: the running statistics stored in the model (the EMA from training)."""

    name = "source"

    def stats_source(self, ctx, eval_source):
        return "ema"

    def bn_stats(self, ctx, eval_source):
        return None


class Precise(Strategy):
    """``precise``: PreciseBN over the training sources' calibration data, in random batches that mix
    the sources as training batches usually do (exact pooled moments; one more statistics pass)."""

    name = "precise"

    def stats_source(self, ctx, eval_source):
        return "precise"

    def bn_stats(self, ctx, eval_source):
        if ctx.precise_stats is None:
            raise ValueError("this context has no PreciseBN statistics (precise_stats)")
        key = ("precise",)
        if key not in ctx._cache:
            ctx._cache[key] = ctx.precise_stats()
        return ctx._cache[key]


class Target(Strategy):
    """``target`` (AdaBN): statistics of the evaluated source's own unlabeled calibration data."""

    name = "target"

    def stats_source(self, ctx, eval_source):
        return eval_source

    def bn_stats(self, ctx, eval_source):
        return ctx.source_stats(eval_source)


class NamedStats(Strategy):
    """``stats:<name>``: statistics of another named source (recalibrate on i, evaluate on j)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.name = f"stats:{source}"

    def stats_source(self, ctx, eval_source):
        return self.source

    def bn_stats(self, ctx, eval_source):
        return ctx.source_stats(self.source)


class PerSource(Target):
    """``per-source`` (DSBN-style): each sample normalized with its own source's statistics.

    Evaluating one source at a time this equals ``target``; it needs the source tag at test time.
    """

    name = "per-source"


class Prior(Strategy):
    """``prior:N`` (Schneider et al. 2020): source (EMA) and target statistics mixed per layer with
    weight N/(N+n) on the source, n the number of target calibration samples; ``prior:0`` = AdaBN."""

    def __init__(self, n: float) -> None:
        if n < 0:
            raise ValueError(f"prior:N needs N >= 0, got {n}")
        self.n = n
        self.name = f"prior:{n:g}"

    def stats_source(self, ctx, eval_source):
        return f"{self.name}|{eval_source}"

    def bn_stats(self, ctx, eval_source):
        target = ctx.source_stats(eval_source)
        n = target.num_samples
        return mix_stats(buffer_stats(ctx.model), target, self.n / (self.n + n) if self.n + n > 0 else 0.0)


class BatchStats(Strategy):
    """``batch:B``: prediction-time BN, the target evaluated in batches of B with their own statistics.

    ``batch:B:mixed`` draws each batch from all evaluated sources together, to show why batch
    composition matters at test time.
    """

    shares_logits = False

    def __init__(self, batch: int, mixed: bool = False) -> None:
        if batch < 2:
            raise ValueError(f"batch:B needs B >= 2 (BN cannot normalize one sample), got {batch}")
        self.batch, self.mixed = batch, mixed
        self.name = f"batch:{batch}" + (":mixed" if mixed else "")

    def stats_source(self, ctx, eval_source):
        return "mixed-batch" if self.mixed else "batch"

    def logits(self, ctx, eval_source, x):
        if not self.mixed:
            return batch_stats_logits(ctx.model, x, self.batch, ctx.seed)
        key = ("mixed-batch", self.batch)
        if key not in ctx._cache:
            names = list(ctx.stats) if ctx.eval_sources is None else list(ctx.eval_sources)
            xs = [ctx.eval_inputs(s) for s in names]
            out = batch_stats_logits(ctx.model, torch.cat(xs), self.batch, ctx.seed)
            ctx._cache[key] = dict(zip(names, torch.split(out, [len(v) for v in xs]), strict=True))
        return ctx._cache[key][eval_source]


class Tent(Strategy):
    """``tent:S`` (Wang et al. 2021): S steps of entropy minimization of BN's affine parameters on the
    target's unlabeled calibration data (Adam, lr 1e-3, batch statistics), on a copy of the model;
    then prediction with batch statistics in batches of the calibration batch size."""

    shares_logits = False

    def __init__(self, steps: int, lr: float = 1e-3, batch: int = 64) -> None:
        if steps < 0:
            raise ValueError(f"tent:S needs S >= 0, got {steps}")
        self.steps, self.lr, self.batch = steps, lr, batch
        self.name = f"tent:{steps}"

    def stats_source(self, ctx, eval_source):
        return eval_source

    def logits(self, ctx, eval_source, x):
        model = copy.deepcopy(ctx.model)
        layers = bn_layers(model)
        params = [p for layer in layers for p in layer.module.parameters(recurse=False)]
        if not params:
            raise ValueError("tent needs BN layers with affine parameters (affine=True)")
        model.eval()
        model.requires_grad_(False)
        for layer in layers:
            layer.module.train()
            layer.module.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        cal = ctx.calibration_inputs(eval_source)
        gen = torch.Generator().manual_seed(ctx.seed)
        device = device_of(model)
        for _ in range(self.steps):
            idx = torch.randperm(len(cal), generator=gen)[: min(self.batch, len(cal))]
            logp = torch.log_softmax(model(cal[idx].to(device)), dim=1)
            loss = -(logp.exp() * logp).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return batch_stats_logits(model, x, self.batch, ctx.seed)


_REGISTRY: dict[str, Callable[[str | None], Strategy]] = {}


def register_strategy(prefix: str, factory: Callable[[str | None], Strategy]) -> None:
    """Make ``"<prefix>"`` / ``"<prefix>:<arg>"`` specs build ``factory(arg)`` (arg ``None`` when absent)."""
    if not prefix or ":" in prefix:
        raise ValueError(f"a strategy prefix must be non-empty and contain no ':', got {prefix!r}")
    _REGISTRY[prefix] = factory


def _no_arg(cls):
    def make(arg):
        if arg is not None:
            raise ValueError(f"strategy {cls.name!r} takes no argument, got {arg!r}")
        return cls()

    return make


def _number(kind, conv):
    def parse(arg):
        try:
            return conv(arg)
        except (TypeError, ValueError):
            raise ValueError(f"strategy {kind!r} needs a number, as in '{kind}:16'; got {arg!r}") from None

    return parse


def _named(arg):
    if not arg:
        raise ValueError("strategy 'stats' needs a source name, as in 'stats:lab_a' (or 'stats:*' in a matrix)")
    return NamedStats(arg)


def _batch(arg):
    if arg is None:
        raise ValueError("strategy 'batch' needs a batch size, as in 'batch:64' or 'batch:64:mixed'")
    size, _, extra = arg.partition(":")
    if extra not in ("", "mixed"):
        raise ValueError(f"unknown batch option {extra!r}; use 'batch:B' or 'batch:B:mixed'")
    return BatchStats(_number("batch", int)(size), mixed=extra == "mixed")


for _prefix, _factory in {
    "source": _no_arg(SourceEMA),
    "precise": _no_arg(Precise),
    "target": _no_arg(Target),
    "per-source": _no_arg(PerSource),
    "prior": lambda a: Prior(_number("prior", float)(a)),
    "batch": _batch,
    "tent": lambda a: Tent(_number("tent", int)(a)),
    "stats": _named,
}.items():
    register_strategy(_prefix, _factory)


def parse_strategy(spec: str | Strategy) -> Strategy:
    """Build a strategy from its spec string (``"source"``, ``"prior:16"``, ``"batch:64:mixed"``, ...)."""
    if isinstance(spec, Strategy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a strategy is a spec string or a Strategy, got {type(spec).__name__}")
    prefix, _, arg = spec.partition(":")
    if prefix not in _REGISTRY:
        raise ValueError(f"unknown strategy {spec!r}; known: {sorted(_REGISTRY)} (register_strategy adds more)")
    return _REGISTRY[prefix](arg or None)


def expand_strategies(specs, sources: list[str]) -> list[Strategy]:
    """Parse specs; ``"stats:*"`` becomes one ``stats:<name>`` per source (the full matrix)."""
    out = []
    for spec in specs:
        if spec == "stats:*":
            out += [NamedStats(s) for s in sources]
        else:
            out.append(parse_strategy(spec))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat: {names}")
    return out


def tensor_inputs(ds: SourceTaggedDataset, batch_size: int = 512) -> torch.Tensor:
    """All inputs of a dataset stacked into one tensor (N, ...), in dataset order."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    parts = [b[0] for b in loader]
    if not parts:
        raise ValueError("dataset is empty")
    return torch.cat(parts)
