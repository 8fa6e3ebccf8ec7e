"""Population statistics: EMA vs PreciseBN during training, and normalization batch size."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from shiftbn._torch import forward_batches, stack_inputs
from shiftbn.bn import bn_layers, freeze_bn, precise_bn, preserved
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import metric_value
from shiftbn.studies.base import FigureSpec, Study, TrainConfig
from shiftbn.studies.common import make_model
from shiftbn.studies.minibatch import exact_batches, outputs_of_batches
from shiftbn.studies.training import train

_HELD_TEST = (0.7, 0.0, 0.3)


def _score(model: nn.Module, test: SourceTaggedDataset, metrics: Sequence[str]) -> dict[str, float]:
    with preserved(model):
        model.eval()
        out = forward_batches(model, test, 512).numpy()
    return {m: metric_value(m, out, test.labels) for m in metrics}


def _precise_copy(model: nn.Module, data: SourceTaggedDataset, n: int, batch_size: int, seed: int) -> nn.Module:
    m = copy.deepcopy(model)
    precise_bn(m, data, num_samples=n, batch_size=batch_size, seed=seed, progress=False)
    return m


@dataclass(kw_only=True)
class EmaVsPrecise(Study):
    """Evaluate with the EMA buffers and with PreciseBN statistics every ``every`` steps.

    Why: paper Section 3 — the EMA mixes statistics of past models; it is worst early in training
    and with large batches. Each size in ``batch_sizes`` is trained (``train.batch_size`` is not
    used) with the learning rate scaled linearly (``train.lr * bs / 32``), once per BN momentum in
    ``momenta``. PreciseBN uses ``precise_samples`` training samples in random batches of the
    training size (on a copy). At the end, PreciseBN accuracy as a function of its sample count
    (``sample_grid``). Rows: ``kind ("curve" | "samples"), batch_size, momentum, step, stats,
    num_samples, metric, value, seed``; the test set pools all sources' test splits.
    """

    name = "ema_vs_precise"
    axis = "batch_sizes"
    figure = FigureSpec("lines", x="step", hue="stats", col="batch_size", where=(("kind", "curve"),),
                        title="EMA vs PreciseBN during training", xlabel="training step")
    default_train = TrainConfig(fractions=_HELD_TEST)

    batch_sizes: Sequence[int] = (16, 128)
    momenta: Sequence[float] = (0.1,)
    every: int = 50
    precise_samples: int = 1000
    sample_grid: Sequence[int] = (100, 300, 1000)
    metrics: Sequence[str] = ("accuracy",)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: int) -> pd.DataFrame:
        rows = [row for mom in self.momenta for row in self._run(ds, seed, int(value), mom)]
        cols = ["kind", "batch_size", "momentum", "step", "stats", "num_samples", "metric", "value", "seed"]
        return pd.DataFrame(rows)[cols]

    def _run(self, ds: SourceTaggedDataset, seed: int, bs: int, mom: float) -> list[dict]:
        sp = ds.split(fractions=self.train.fractions, seed=seed)
        net = make_model(self.train.model, ds, seed)
        for layer in bn_layers(net):
            layer.module.momentum = mom
        base = dict(kind="curve", batch_size=bs, momentum=mom, seed=seed)
        rows: list[dict] = []

        def probe(step: int, m: nn.Module) -> None:
            for stats, scored in (("ema", m), ("precise", _precise_copy(m, sp.train, self.precise_samples, bs, step))):
                for k, v in _score(scored, sp.test, self.metrics).items():
                    rows.append({**base, "step": step, "stats": stats,
                                 "num_samples": self.precise_samples if stats == "precise" else np.nan,
                                 "metric": k, "value": v})

        train(net, sp.train, steps=self.train.steps, batch_size=bs, lr=self.train.lr * bs / 32, seed=seed,
              callback=probe, every=self.every, progress=False)
        for n in self.sample_grid:
            scored = _precise_copy(net, sp.train, n, bs, seed)
            for k, v in _score(scored, sp.test, self.metrics).items():
                rows.append({**base, "kind": "samples", "step": self.train.steps, "stats": "precise",
                             "num_samples": n, "metric": k, "value": v})
        return rows


@dataclass(kw_only=True)
class NormalizationBatchSize(Study):
    """Train with BN normalizing over ghost batches of each size at a fixed SGD batch; evaluate five ways.

    Why: paper Section 4 — with tiny normalization batches, the statistics the network was trained
    with differ from population statistics (train-test inconsistency). ``eval``: on the test split,
    ``population`` (PreciseBN statistics from batches of the ghost size), ``minibatch`` (test batches
    of the ghost size normalized with their own statistics), ``frozen`` (``frozen_steps`` more SGD
    steps at ``frozen_lr``, default ``train.lr / 100``, with ``freeze_bn`` — population statistics
    in training — then population statistics; without BN's feedback larger rates diverge here),
    ``extra_steps`` (the control for ``frozen``: as many more ordinary steps at the same rate, BN over
    ghost batches, then population statistics; only with ``control=True``); on ``train_eval_samples``
    samples of the training split, ``train_minibatch`` (the paper's third curve: what training
    itself sees) and ``train_population``. Evaluation mini-batches are built like training's ghost batches: exactly
    the ghost size, drawn uniformly over the pooled sources (``exact_batches``); the ghost sizes must
    divide the SGD batch ``train.batch_size``. Rows: ``ghost_batch, eval, metric, value, n, seed``.
    """

    name = "normalization_batch_size"
    axis = "ghost_sizes"
    figure = FigureSpec("lines", x="ghost_batch", hue="eval", log2_x=True,
                        title="Normalization batch size: population vs mini-batch vs FrozenBN",
                        xlabel="normalization (ghost) batch size")
    default_train = TrainConfig(batch_size=128, lr=0.1, fractions=_HELD_TEST)

    ghost_sizes: Sequence[int] = (2, 4, 8, 32, 128)
    frozen_steps: int = 50
    frozen_lr: float | None = None
    precise_samples: int = 2000
    control: bool = True
    train_eval_samples: int | None = 2000
    metrics: Sequence[str] = ("accuracy",)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [g for g in self.ghost_sizes if not 2 <= g <= self.train.batch_size or self.train.batch_size % g]
        if bad:
            raise ValueError(f"ghost_sizes {bad} must lie in [2, batch_size={self.train.batch_size}] and divide it, "
                             "so that every normalization batch in training has exactly the ghost size")

    def cell(self, ds: SourceTaggedDataset, seed: int, value: int) -> pd.DataFrame:
        g, cfg = int(value), self.train
        sp = ds.split(fractions=cfg.fractions, seed=seed)
        net = make_model(cfg.model, ds, seed)
        train(net, sp.train, steps=cfg.steps, batch_size=cfg.batch_size, ghost_batch=g, lr=cfg.lr, seed=seed,
              progress=False)
        pop = _precise_copy(net, sp.train, self.precise_samples, g, seed)
        frozen_lr = cfg.lr / 100 if self.frozen_lr is None else self.frozen_lr
        frozen = copy.deepcopy(pop)
        with freeze_bn(frozen):
            train(frozen, sp.train, steps=self.frozen_steps, batch_size=cfg.batch_size, lr=frozen_lr, seed=seed + 1,
                  progress=False)
        train_part = sp.train
        if self.train_eval_samples is not None and self.train_eval_samples < len(sp.train):
            pick = np.random.default_rng(seed).choice(len(sp.train), self.train_eval_samples, replace=False)
            train_part = sp.train.take(np.sort(pick))
        results = {}
        for where, part in (("", sp.test), ("train_", train_part)):
            x = stack_inputs(part)
            mini = outputs_of_batches(net, x, exact_batches(len(part), g, seed)).numpy()
            results[where + "population"] = (_score(pop, part, self.metrics), len(part))
            results[where + "minibatch"] = ({m: metric_value(m, mini, part.labels) for m in self.metrics}, len(part))
        results["frozen"] = (_score(frozen, sp.test, self.metrics), len(sp.test))
        if self.control:
            extra = copy.deepcopy(net)
            train(extra, sp.train, steps=self.frozen_steps, batch_size=cfg.batch_size, ghost_batch=g, lr=frozen_lr,
                  seed=seed + 1, progress=False)
            extra = _precise_copy(extra, sp.train, self.precise_samples, g, seed)
            results["extra_steps"] = (_score(extra, sp.test, self.metrics), len(sp.test))
        rows = [{"ghost_batch": g, "eval": ev, "metric": m, "value": v, "n": n, "seed": seed}
                for ev, (scores, n) in results.items() for m, v in scores.items()]
        return pd.DataFrame(rows)
