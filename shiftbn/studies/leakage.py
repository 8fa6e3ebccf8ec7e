"""Information leakage within a batch (paper Section 6): bags that share context (``BagLeakage``), and
batches of independent samples whose composition reveals the label (``LeakageProbe``, a negative control)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from shiftbn._torch import forward_batches, stack_inputs
from shiftbn.bn import freeze_bn, precise_bn
from shiftbn.bn.batchstats import batch_stats_logits
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.studies.bags import Bags, make_bags
from shiftbn.studies.base import FigureSpec, Study, TrainConfig
from shiftbn.studies.common import make_model
from shiftbn.studies.minibatch import exact_batches, outputs_of_batches
from shiftbn.studies.training import train

Composition = Literal["random", "skewed", "one-class"]
COMPOSITIONS = ("random", "skewed", "one-class")


def _groups(labels: np.ndarray, composition: str, skew: float, rng: np.random.Generator) -> np.ndarray | None:
    """Batch groups: ``one-class`` = the label; ``skewed`` = two groups, group g holding the classes of
    half g with probability ``skew``; ``random`` = none."""
    if composition == "random":
        return None
    if composition == "one-class":
        return labels.copy()
    half = (labels >= (labels.max() + 1) / 2).astype(np.int64)
    flip = rng.random(len(labels)) > skew
    return np.where(flip, 1 - half, half)


def _same_composition_accuracy(net, test: SourceTaggedDataset, groups, batch_size, seed) -> float:
    y = test.labels
    if groups is None:
        logits = batch_stats_logits(net, test, batch_size, seed)
        return float((logits.argmax(1).numpy() == y).mean())
    correct = 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) >= 2:
            logits = batch_stats_logits(net, test.take(idx), batch_size, seed)
            correct += int((logits.argmax(1).numpy() == y[idx]).sum())
    return correct / len(y)


@dataclass(kw_only=True)
class LeakageProbe(Study):
    """Train with batches whose composition does or does not reveal the label; compare the accuracy
    seen with batch statistics and with population statistics.

    Why: BN makes a sample's output depend on its batch. ``compositions``: ``random`` batches;
    ``skewed`` — batches from one of two groups (sites) whose class mixes differ (``skew`` of a
    group's samples come from its half of the classes); ``one-class`` — every batch one class.
    ``eval``: ``train_batches`` (mean batch accuracy over the last quarter of training, BN in train
    mode), ``test_same_composition`` (test batches built the same way, normalized by themselves),
    ``test_population`` (PreciseBN statistics from random batches: what deployment delivers).
    Rows: ``composition, eval, metric, value, seed``.
    """

    name = "leakage_probe"
    axis = "compositions"
    figure = FigureSpec("bars", x="composition", hue="eval", title="Batch composition that reveals the label")
    default_train = TrainConfig(fractions=(0.7, 0.0, 0.3))

    compositions: Sequence[Composition] = COMPOSITIONS
    skew: float = 0.9
    precise_samples: int = 2000

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        cfg, comp = self.train, value
        rng = np.random.default_rng(seed)
        sp = ds.split(fractions=cfg.fractions, seed=seed)
        net = make_model(cfg.model, ds, seed)
        groups = _groups(sp.train.labels, comp, self.skew, rng)
        log = train(net, sp.train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                    mode="random" if groups is None else "single", groups=groups, progress=False)
        pop = copy.deepcopy(net)
        precise_bn(pop, sp.train, num_samples=self.precise_samples, batch_size=cfg.batch_size, seed=seed,
                   progress=False)
        y_test = sp.test.labels
        results = {
            "train_batches": float(log["accuracy"].iloc[-max(1, cfg.steps // 4):].mean()),
            "test_same_composition": _same_composition_accuracy(
                net, sp.test, _groups(y_test, comp, self.skew, rng), cfg.batch_size, seed),
            "test_population": float((forward_batches(pop.eval(), sp.test, 512).argmax(1).numpy() == y_test).mean()),
        }
        return pd.DataFrame([{"composition": comp, "eval": ev, "metric": "accuracy", "value": v, "seed": seed}
                             for ev, v in results.items()])


Arm = str
ARMS = ("grouped", "shuffled", "sync:4", "frozen")
BAG_EVALS = ("train_batches", "bags", "shuffled", "population")


def _parse_arm(arm: str, bags_per_batch: int) -> int:
    """The number of bags one BN normalization batch spans in training (0 for ``frozen``'s last phase
    is handled by the caller): ``grouped``/``frozen`` 1, ``shuffled`` 1 bag's worth of random samples,
    ``sync:K`` K bags (K must divide the bags per SGD batch)."""
    if arm in ("grouped", "shuffled", "frozen"):
        return 1
    head, _, k = arm.partition(":")
    if head != "sync" or not k.isdigit() or int(k) < 1:
        raise ValueError(f"arm {arm!r}: use one of 'grouped', 'shuffled', 'frozen' or 'sync:K' (K bags per BN batch)")
    if bags_per_batch % int(k):
        raise ValueError(f"arm {arm!r}: K={k} must divide the bags per SGD batch ({bags_per_batch}); "
                         "change batch_size or K")
    return int(k)


def _bag_groups(bags: Bags, k: int, seed: int) -> list[np.ndarray]:
    """Normalization batches of ``k`` whole bags each (bags drawn at random; a remainder is dropped)."""
    per_bag = bags.bag_batches()
    order = np.random.default_rng(seed).permutation(len(per_bag))
    return [np.concatenate([per_bag[b] for b in order[i : i + k]]) for i in range(0, len(order) - k + 1, k)]


@dataclass(kw_only=True)
class BagLeakage(Study):
    """Bags that share a nuisance and a class mix: trained with each bag as one BN batch, or not.

    Why: paper Section 6 — when samples normalized together share context, BN lets the model read
    that context from the batch: high accuracy with its own batches that population statistics do
    not deliver. Shuffling across bags, a larger normalization group (SyncBN) or population
    statistics in training (FrozenBN) are the remedies. Train and test splits are cut into bags of
    ``bag_size`` (``make_bags``: offset ~ Normal(0, ``nuisance``^2) per bag; ``skew`` of a bag's
    samples from its half of the classes); an SGD batch holds ``train.batch_size // bag_size``
    whole bags. ``arms``: ``grouped`` (BN over each bag), ``shuffled`` (BN over random samples of
    the same size, MoCo's shuffle BN), ``sync:K`` (BN over K bags), ``frozen`` (grouped, then the
    last ``frozen_fraction`` of the steps with population statistics, ``freeze_bn``, at
    ``frozen_lr``, default ``train.lr / 50``: at ``train.lr / 10`` it diverged here). ``eval``:
    ``train_batches`` (batch accuracy, last quarter of training), on the test bags: ``bags`` (each
    test bag normalized by itself), ``shuffled`` (random test batches of ``bag_size``,
    ``exact_batches``) and ``population`` (PreciseBN statistics over the arm's own training
    normalization batches; FrozenBN keeps the statistics it trained with). Rows: ``arm, eval, metric, value, n, seed``.
    """

    name = "bag_leakage"
    axis = "arms"
    figure = FigureSpec("bars", x="arm", hue="eval", title="Leakage through shared context in a BN batch")
    default_train = TrainConfig(batch_size=64, fractions=(0.7, 0.0, 0.3))

    arms: Sequence[Arm] = ARMS
    bag_size: int = 16
    nuisance: float = 1.0
    skew: float = 0.9
    frozen_fraction: float = 0.25
    frozen_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bag_size < 2 or self.train.batch_size % self.bag_size:
            raise ValueError(f"batch_size={self.train.batch_size} must be a multiple of bag_size={self.bag_size} "
                             "(>= 2): an SGD batch holds whole bags")
        if not 0 < self.frozen_fraction < 1:
            raise ValueError(f"frozen_fraction must lie in (0, 1), got {self.frozen_fraction}")
        for arm in self.arms:
            _parse_arm(arm, self.train.batch_size // self.bag_size)

    def _bags(self, data: SourceTaggedDataset, seed: int) -> Bags:
        return make_bags(stack_inputs(data), data.labels, bag_size=self.bag_size, skew=self.skew,
                         nuisance=self.nuisance, seed=seed)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        cfg, arm, b = self.train, value, self.bag_size
        per_batch = cfg.batch_size // b
        k = _parse_arm(arm, per_batch)
        sp = ds.split(fractions=cfg.fractions, seed=seed)
        tr, te = self._bags(sp.train, seed), self._bags(sp.test, seed + 10_000)
        net = make_model(cfg.model, ds, seed)
        steps = cfg.steps - (round(cfg.steps * self.frozen_fraction) if arm == "frozen" else 0)
        sampling = (dict(mode="random") if arm == "shuffled"
                    else dict(mode="mixed", sources_per_batch=per_batch, groups=tr.bag))
        log = train(net, tr.data, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                    ghost_batch=None if k * b == cfg.batch_size else k * b, progress=False, **sampling)
        norm_batches = (exact_batches(len(tr.labels), b, seed) if arm == "shuffled" else _bag_groups(tr, k, seed))
        pop = copy.deepcopy(net)
        precise_bn(pop, tr.data, num_samples=None, sampler=[i.tolist() for i in norm_batches], progress=False)
        if arm == "frozen":
            with freeze_bn(pop):
                log = train(pop, tr.data, steps=cfg.steps - steps, batch_size=cfg.batch_size,
                            lr=cfg.lr / 50 if self.frozen_lr is None else self.frozen_lr, seed=seed + 1,
                            progress=False, **sampling)
            net = pop
        tail = log["accuracy"].iloc[-max(1, len(log) // 4):]
        y = te.labels
        scored = {"bags": outputs_of_batches(net, te.x, te.bag_batches()),
                  "shuffled": outputs_of_batches(net, te.x, exact_batches(len(y), b, seed)),
                  "population": forward_batches(pop.eval(), te.x, 512)}
        rows = [{"eval": "train_batches", "value": float(tail.mean()), "n": len(tail) * cfg.batch_size}]
        rows += [{"eval": ev, "value": float((out.argmax(1).numpy() == y).mean()), "n": len(y)}
                 for ev, out in scored.items()]
        return pd.DataFrame([{"arm": arm, **r, "metric": "accuracy", "seed": seed} for r in rows])[
            ["arm", "eval", "metric", "value", "n", "seed"]]
