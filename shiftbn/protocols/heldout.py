"""Held-out source (leave-one-lab-out): how does the model do on a lab it never saw?"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import cross_source_matrix
from shiftbn.protocols.common import ModelSpec, as_seeds, fit


def held_out_sources(
    ds: SourceTaggedDataset,
    model: ModelSpec = "SmallCNN",
    *,
    held_out: Sequence[str] | None = None,
    sampler_mode: str = "random",
    strategies: Sequence[str] = ("source", "precise", "target", "prior:16"),
    metrics: Sequence[str] = ("accuracy",),
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seeds: int | Sequence[int] = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """For each held-out source h: train on the other sources, evaluate on h and on their test splits.

    Why: the users' headline question — will the model work on a new lab, and does recalibrating
    on that lab's unlabeled data (``target``) rescue it? Every source is split per ``fractions``
    (train / calibration / test, stratified, per seed); statistics come from calibration splits,
    ``precise`` uses the training sources only. ``held_out`` defaults to every source.
    Returns tidy rows: ``held_out, eval_source, is_held_out, strategy, stats_source, metric,
    value, n, seed, sampler_mode``.
    """
    sources = ds.sources_present
    targets = list(sources if held_out is None else [str(h) for h in held_out])
    for h in targets:
        ds.source_id(h)
    frames = []
    jobs = [(seed, h) for seed in as_seeds(seeds) for h in targets]
    for seed, h in tqdm(jobs, desc="held-out", disable=not progress, leave=False):
        sp = ds.split(fractions=fractions, seed=seed)
        rest = [s for s in sources if s != h]
        model_h = fit(model, sp.train.subset(rest), seed, steps=steps, batch_size=batch_size, mode=sampler_mode,
                      lr=lr, progress=False)
        table = cross_source_matrix(model_h, ds, strategies, metrics, calibration=(sp.calibration, sp.test),
                                    train_sources=rest, seed=seed, progress=False)
        table.insert(0, "held_out", h)
        table.insert(2, "is_held_out", table["eval_source"] == h)
        frames.append(table.assign(seed=seed, sampler_mode=sampler_mode))
    return pd.concat(frames, ignore_index=True)
