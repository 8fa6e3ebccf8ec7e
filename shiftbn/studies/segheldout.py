"""Held-out site for segmentation: leave-one-site-out Dice and HD95 per case, offline and online (case by case).

Why: the BN rows the segmentation test-time-adaptation literature lacks (MedSeg-TTA has no AdaBN,
PreciseBN or prior-weighted BN): a U-Net trained on the other sites, evaluated on a site it never saw
with the model's statistics, recalibrated ones, and the online, case-by-case adaptation that
segmentation TTA runs (one case at a time, in a seeded order).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from shiftbn._torch import concat_inputs
from shiftbn.adapt import AdaptContext, BatchStats, Prior, Strategy, Tent, parse_strategy
from shiftbn.adapt.tent import tent_online_logits
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate.dense import case_values
from shiftbn.evaluate.matrix import checked_outputs, collect, prepare, task_metrics
from shiftbn.samplers import SamplerMode
from shiftbn.studies.base import FigureSpec, Study, TrainConfig
from shiftbn.studies.common import fit, held_out_values


class SequenceTent(Tent):
    """Online Tent over every evaluated source one after another, one stream, adaptation carried across them.

    Why: the continual form of segmentation TTA ("sources in sequence"): the sources come in an order
    ``seed`` draws, each source's cases in an order ``seed`` draws, and the adapted parameters and
    Adam's state carry over from case to case and from one source to the next. The stream is run once
    per seeded order (``ctx.memo``) and each source's outputs are read from it, so every
    (strategy, source) cell of the matrix scores its own part of one stream. Runs on a copy.

    Args:
        as ``Tent`` (``batch=1``: case by case).

    Returns:
        The strategy ``tent-sequence[:all][:k=K]``.
    """

    def __init__(self, batch: int = 1, steps: int = 1, episodic: bool = False, lr: float = 1e-3,
                 groupings: int = 1, all_bn: bool = False) -> None:
        super().__init__(batch, steps, episodic, lr, groupings, all_bn)
        self.name = self.name.replace("tent", "tent-sequence", 1)

    def grouped_logits(self, ctx: AdaptContext, eval_source: str, x, seed: int):
        return ctx.memo(("shiftbn-studies", "tent-sequence", self.name, seed), lambda: self._stream(ctx, seed))[
            eval_source]

    def _stream(self, ctx: AdaptContext, seed: int) -> dict:
        names = list(ctx.eval_sources)
        parts = [ctx.eval_inputs(s) for s in names]
        starts = np.cumsum([0, *map(len, parts)])
        chunks = sequence_order([len(p) for p in parts], self.batch, seed)
        out = tent_online_logits(ctx.model, concat_inputs(parts), self.batch, seed, steps=self.steps,
                                 episodic=self.episodic, lr=self.lr, amp=ctx.amp, all_bn=self.all_bn,
                                 runner=ctx.runner, chunks=chunks)
        return {s: out[starts[i]:starts[i + 1]] for i, s in enumerate(names)}


def sequence_order(sizes: Sequence[int], batch: int, seed: int) -> list:
    """The stream of ``SequenceTent``: sources in a seeded order, each one's positions (offset into the
    concatenation of the sources) shuffled with the same generator and cut into batches of ``batch``."""
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0, *sizes])
    chunks = []
    for s in rng.permutation(len(sizes)):
        order = starts[s] + rng.permutation(int(sizes[s]))
        chunks += [torch.from_numpy(order[i:i + batch].copy()) for i in range(0, len(order), batch)]
    return chunks


def online_strategy(spec: str, stream: str, orders: int) -> Strategy:
    """The case-by-case (batch 1) form of ``spec``, named ``online[<stream>]:<spec>``.

    ``tent``/``tent:all``/``tent-episodic[:all]``: online Tent with one case per step, scored over
    ``orders`` seeded stream orders; ``stream="site"``: each evaluated site is its own stream;
    ``"sequence"``: all evaluated sites form one stream (``SequenceTent``). ``prior:N``: each case
    mixes its own statistics with the model's, weight N/(N+1) on the model's; ``batch``: each case
    normalized by its own statistics. These two depend on the case alone, not on the stream or the
    order: one order is scored and their stream is ``"case"`` whatever ``stream`` says.
    """
    if not isinstance(spec, str):
        raise TypeError(f"online strategies are spec strings such as 'tent' or 'prior:16', got {spec!r}")
    parsed = parse_strategy("batch:1" if spec == "batch" else spec)
    if isinstance(parsed, Tent):
        cls = SequenceTent if stream == "sequence" else Tent
        made: Strategy = cls(batch=1, steps=parsed.steps, episodic=parsed.episodic, lr=parsed.lr,
                             groupings=orders, all_bn=parsed.all_bn)
    elif isinstance(parsed, Prior) and parsed.samples is None:
        made, stream = Prior(parsed.n, batch=1, groupings=1), "case"
    elif isinstance(parsed, BatchStats) and parsed.batch == 1 and not parsed.mixed:
        made, stream = BatchStats(1, groupings=1), "case"
    else:
        raise ValueError(f"online strategy {spec!r} has no case-by-case form; use 'tent', 'tent:all', "
                         "'tent-episodic', 'prior:N' or 'batch'")
    made.name = f"online[{stream}]:{spec}"
    return made


def _split_name(name: str) -> tuple[str, str, str]:
    """``online[site]:tent`` -> ``("online", "site", "tent")``; an offline name -> ``("offline", "", name)``."""
    if not name.startswith("online["):
        return "offline", "", name
    stream, _, spec = name[len("online["):].partition("]:")
    return "online", stream, spec


@dataclass(kw_only=True)
class SegHeldOutSites(Study):
    """For each held-out site h: train a segmenter on the other sites, score every test case of every site.

    Why: the leave-one-site-out question for segmenters, with the test-time strategies offline (the
    statistics or adaptation from each site's unlabeled calibration cases, or test batches of
    several cases) and online (``online``: one case at a time, batch 1, in seeded orders, as
    segmentation TTA runs it). Every site is split per ``train.fractions`` (per seed); ``precise``
    pools the training sites' calibration cases. ``streams`` (online Tent; each listed one is run):
    ``"site"`` streams each site's test cases alone (adaptation restarts per site); ``"sequence"``
    streams all sites' test cases one site after another in a seeded order, online Tent carrying
    its adaptation across cases and sites (``SequenceTent``). Online ``prior:N`` and ``batch``
    depend on the case alone (stream ``"case"``). ``orders``: seeded stream orders online Tent is
    scored over (order k is seeded by ``grouping_seed(seed, k)``). Training: see
    ``train`` (cross-entropy + ``dice_weight`` x soft Dice).

    Rows, one per case and metric: ``held_out, eval_source, is_held_out, strategy, mode, stream, metric,
    case, value, value_sd, groupings, seconds, seed``. ``mode``: ``offline`` or ``online`` (``stream``:
    ``site``, ``sequence`` or ``case``; empty offline); ``value``: the
    case's score (mean over the strategy's groupings/orders, ``value_sd`` their sd, NaN for one);
    ``case``: the case id (metadata ``case``, else its position); ``seconds``: the wall time of the
    (strategy, site) cell. ``case_intervals`` turns them into means with case-level intervals.

    Example:
        >>> import shiftbn as sb
        >>> from shiftbn.studies import SegHeldOutSites, TrainConfig
        >>> study = SegHeldOutSites(train=TrainConfig(model={"name": "UNet2d", "width": 4}, steps=2, batch_size=4),
        ...                         held_out=["site_c"], strategies=["ema", "target"], online=["tent"], orders=1)
        >>> table = study.run(sb.load("seg-sites-2d", n=6, size=16, sites=3), progress=False)
        >>> sorted(set(zip(table["mode"], table["strategy"])))
        [('offline', 'ema'), ('offline', 'target'), ('online', 'tent')]
    """

    name = "seg_held_out_sites"
    axis = "held_out"
    figure = FigureSpec("bars", x="held_out", hue="strategy", col="mode", where=(("is_held_out", True),),
                        title="Held-out {source}: mean Dice per case by strategy",
                        xlabel="held-out {source} (never seen in training)")
    default_train = TrainConfig(model={"name": "UNet2d", "width": 8}, steps=150, batch_size=16, lr=0.05)

    held_out: Sequence[str] | None = None
    sampler_mode: SamplerMode = "random"
    strategies: Sequence[str] = ("ema", "precise", "target", "prior:16:8", "batch:8", "tent-offline:10")
    online: Sequence[str] = ("tent", "prior:16", "batch")
    streams: Sequence[Literal["site", "sequence"]] = ("site",)
    orders: int = 3
    metrics: Sequence[str] = ("dice", "hd95")
    dice_weight: float = 1.0
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.strategies, str) or isinstance(self.online, str) or isinstance(self.metrics, str):
            raise ValueError("strategies, online and metrics are lists, e.g. online = ['tent', 'prior:16']")
        if not self.strategies and not self.online:
            raise ValueError("give at least one strategy (strategies, offline) or online strategy (online)")
        if self.orders < 1:
            raise ValueError(f"orders must be >= 1 (seeded stream orders of online tent), got {self.orders}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not self.dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0 (0: cross-entropy alone), got {self.dice_weight}")
        task_metrics(self.metrics, "segmentation")
        self._strategies()

    def _strategies(self) -> list[Strategy]:
        offline = [parse_strategy(s) for s in self.strategies]
        if not self.streams and self.online:
            raise ValueError("streams must name at least one stream ('site' or 'sequence') for the online strategies")
        made = {}
        for spec in self.online:
            for stream in self.streams:
                strat = online_strategy(spec, stream, self.orders)
                made.setdefault(strat.name, strat)  # per-case strategies are the same in every stream
        online = list(made.values())
        names = [s.name for s in offline + online]
        if len(set(names)) != len(names):
            raise ValueError(f"strategies repeat: {names}")
        return offline + online

    def axis_values(self, ds: SourceTaggedDataset) -> list[str]:
        return held_out_values(ds, self.held_out)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        sp = ds.split(fractions=self.train.fractions, seed=seed)
        rest = [s for s in ds.sources_present if s != value]
        model = fit(self.train, sp.train.subset(rest), seed, mode=self.sampler_mode, dice_weight=self.dice_weight)
        plan = prepare(ds, self._strategies(), calibration=(sp.calibration, sp.test), train_sources=rest, seed=seed)
        ctx, _ = collect(model, plan, batch_size=self.eval_batch_size, seed=seed, progress=False,
                         task="segmentation")
        frames = []
        for strat in plan.strategies:
            for src in plan.eval_sources:
                t0 = time.perf_counter()
                outs = [checked_outputs(strat, src, o) for o in strat.outputs(ctx, src, ctx.eval_inputs(src))]
                seconds = time.perf_counter() - t0
                frames.append(self._case_rows(plan.evaluation.subset(src), strat, src, outs, seconds))
        table = pd.concat(frames, ignore_index=True)
        table.insert(0, "held_out", value)
        table.insert(2, "is_held_out", table["eval_source"] == value)
        return table.assign(seed=seed)

    def _case_rows(self, part: SourceTaggedDataset, strat: Strategy, src: str, outs: list[np.ndarray],
                   seconds: float) -> pd.DataFrame:
        meta = getattr(part, "metadata", None)
        cases = (meta["case"].astype(str).to_numpy() if meta is not None and "case" in meta
                 else np.arange(len(outs[0])).astype(str))
        mode, stream, name = _split_name(strat.name)
        frames = []
        for m in self.metrics:
            per = np.stack([case_values(m, o) for o in outs])  # (groupings, cases)
            frames.append(pd.DataFrame({
                "eval_source": src, "strategy": name, "mode": mode, "stream": stream, "metric": m,
                "case": cases, "value": per.mean(0),
                "value_sd": per.std(0, ddof=1) if len(per) > 1 else np.nan, "groupings": len(per),
                "seconds": seconds}))
        return pd.concat(frames, ignore_index=True)
