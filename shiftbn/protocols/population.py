"""Population statistics: EMA vs PreciseBN during training, and normalization batch size."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from shiftbn._torch import batch_stats_logits, forward_batches, stack_inputs
from shiftbn.bn import bn_layers, freeze_bn, precise_bn, preserved
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import metric_value
from shiftbn.protocols.common import ModelSpec, as_seeds, make_model
from shiftbn.train import train


def _score(model: nn.Module, x: torch.Tensor, y: np.ndarray, metrics: Sequence[str]) -> dict[str, float]:
    with preserved(model):
        model.eval()
        out = forward_batches(model, x, 512).numpy()
    return {m: metric_value(m, out, y) for m in metrics}


def _precise_copy(model: nn.Module, data: SourceTaggedDataset, n: int, batch_size: int, seed: int) -> nn.Module:
    m = copy.deepcopy(model)
    precise_bn(m, data, num_samples=n, batch_size=batch_size, seed=seed, progress=False)
    return m


def ema_vs_precise(
    ds: SourceTaggedDataset,
    model: ModelSpec = "SmallCNN",
    *,
    batch_sizes: Sequence[int] = (16, 128),
    momenta: Sequence[float] = (0.1,),
    steps: int = 300,
    every: int = 50,
    precise_samples: int = 1000,
    sample_grid: Sequence[int] = (100, 300, 1000),
    metrics: Sequence[str] = ("accuracy",),
    lr: float = 0.05,
    fractions: tuple[float, float, float] = (0.7, 0.0, 0.3),
    seeds: int | Sequence[int] = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate with the EMA buffers and with PreciseBN statistics every ``every`` steps.

    Why: paper Section 3 — the EMA mixes statistics of past models; it is worst early in training
    and with large batches. The learning rate scales linearly with the batch (``lr * bs / 32``).
    PreciseBN uses ``precise_samples`` training samples in random batches of the training size
    (on a copy). At the end, PreciseBN accuracy as a function of its sample count (``sample_grid``).
    Returns tidy rows: ``kind ("curve" | "samples"), batch_size, momentum, step, stats, num_samples,
    metric, value, seed``; the test set pools all sources' test splits.
    """
    rows = []
    jobs = [(s, b, m) for s in as_seeds(seeds) for b in batch_sizes for m in momenta]
    for seed, bs, mom in tqdm(jobs, desc="ema-vs-precise", disable=not progress, leave=False):
        sp = ds.split(fractions=fractions, seed=seed)
        x_test, y_test = stack_inputs(sp.test), sp.test.labels
        net = make_model(model, ds, seed)
        for layer in bn_layers(net):
            layer.module.momentum = mom
        base = dict(kind="curve", batch_size=bs, momentum=mom, seed=seed)

        def probe(step: int, m: nn.Module, base=base, sp=sp, x_test=x_test, y_test=y_test, bs=bs) -> None:
            for stats, scored in (("ema", m), ("precise", _precise_copy(m, sp.train, precise_samples, bs, step))):
                for k, v in _score(scored, x_test, y_test, metrics).items():
                    rows.append({**base, "step": step, "stats": stats,
                                 "num_samples": precise_samples if stats == "precise" else np.nan,
                                 "metric": k, "value": v})

        train(net, sp.train, steps=steps, batch_size=bs, lr=lr * bs / 32, seed=seed, callback=probe, every=every,
              progress=False)
        for n in sample_grid:
            scored = _precise_copy(net, sp.train, n, bs, seed)
            for k, v in _score(scored, x_test, y_test, metrics).items():
                rows.append({**base, "kind": "samples", "step": steps, "stats": "precise", "num_samples": n,
                             "metric": k, "value": v})
    cols = ["kind", "batch_size", "momentum", "step", "stats", "num_samples", "metric", "value", "seed"]
    return pd.DataFrame(rows)[cols]


def normalization_batch_size(
    ds: SourceTaggedDataset,
    model: ModelSpec = "SmallCNN",
    *,
    ghost_sizes: Sequence[int] = (2, 4, 8, 32, 128),
    batch_size: int = 128,
    steps: int = 300,
    frozen_steps: int = 50,
    frozen_lr: float | None = None,
    precise_samples: int = 2000,
    metrics: Sequence[str] = ("accuracy",),
    lr: float = 0.1,
    fractions: tuple[float, float, float] = (0.7, 0.0, 0.3),
    seeds: int | Sequence[int] = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Train with BN normalizing over ghost batches of each size at a fixed SGD batch; evaluate three ways.

    Why: paper Section 4 — with tiny normalization batches, the statistics the network was trained
    with differ from population statistics. ``eval``: ``population`` (PreciseBN statistics from
    batches of the ghost size), ``minibatch`` (test batches of the ghost size normalized with their
    own statistics), ``frozen`` (``frozen_steps`` more SGD steps at ``frozen_lr``, default ``lr / 100``,
    with ``freeze_bn`` — population statistics in training — then population statistics; without BN's
    feedback larger rates diverge here). Returns tidy rows: ``ghost_batch, eval, metric, value, seed``.
    """
    rows = []
    jobs = [(s, g) for s in as_seeds(seeds) for g in ghost_sizes]
    for seed, g in tqdm(jobs, desc="norm-batch", disable=not progress, leave=False):
        sp = ds.split(fractions=fractions, seed=seed)
        x_test, y_test = stack_inputs(sp.test), sp.test.labels
        net = make_model(model, ds, seed)
        train(net, sp.train, steps=steps, batch_size=batch_size, ghost_batch=g, lr=lr, seed=seed, progress=False)
        pop = _precise_copy(net, sp.train, precise_samples, g, seed)
        mini = batch_stats_logits(net, x_test, g, seed).numpy()
        frozen = copy.deepcopy(pop)
        with freeze_bn(frozen):
            train(frozen, sp.train, steps=frozen_steps, batch_size=batch_size,
                  lr=lr / 100 if frozen_lr is None else frozen_lr, seed=seed + 1, progress=False)
        results = {"population": _score(pop, x_test, y_test, metrics),
                   "minibatch": {m: metric_value(m, mini, y_test) for m in metrics},
                   "frozen": _score(frozen, x_test, y_test, metrics)}
        for ev, scores in results.items():
            for m, v in scores.items():
                rows.append({"ghost_batch": g, "eval": ev, "metric": m, "value": v, "seed": seed})
    return pd.DataFrame(rows)
