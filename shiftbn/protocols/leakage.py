"""Information leakage within a batch (paper Section 6): when batch composition reveals the label."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from shiftbn._torch import batch_stats_logits, forward_batches
from shiftbn.bn import precise_bn
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.protocols.base import FigureSpec, Study, TrainConfig, make_study
from shiftbn.protocols.common import make_model
from shiftbn.train import train

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


def leakage_probe(ds: SourceTaggedDataset, model=None, *, progress: bool = True, **params) -> pd.DataFrame:
    """Run ``LeakageProbe`` on ``ds``; ``params`` are its fields, training keys inline or as ``train=``."""
    return make_study(LeakageProbe.name, {"model": model, **params}).run(ds, progress)
