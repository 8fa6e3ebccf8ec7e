"""Held-out source (leave-one-lab-out): how does the model do on a lab it never saw?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import cross_source_matrix
from shiftbn.samplers import SamplerMode
from shiftbn.studies.base import FigureSpec, Study
from shiftbn.studies.common import fit_without, held_out_values


@dataclass(kw_only=True)
class HeldOutSources(Study):
    """For each held-out source h: train on the other sources, evaluate on h and on their test splits.

    Why: the users' headline question — will the model work on a new lab, and does recalibrating
    on that lab's unlabeled data (``target``) rescue it? Every source is split per
    ``train.fractions`` (train / calibration / test, stratified, per seed); statistics come from
    calibration splits, ``precise`` uses the training sources only. ``held_out`` defaults to every
    source; ``sampler_mode`` is the training batch composition.
    Rows: ``held_out, eval_source, is_held_out, strategy, is_cross_source, stats_source, metric,
    value, n, seed, sampler_mode``.

    Example:
        >>> import shiftbn as sb
        >>> from shiftbn.studies import HeldOutSources, TrainConfig
        >>> study = HeldOutSources(train=TrainConfig(model="MLP", steps=5), held_out=["lab_3"],
        ...                        strategies=["ema", "target"], seeds=[0, 1])
        >>> table = study.run(sb.load("blobs-labs", n=200), progress=False)
        >>> table.query("is_held_out").groupby("strategy")["value"].count().to_dict()
        {'ema': 2, 'target': 2}
    """

    name = "held_out_sources"
    axis = "held_out"
    figure = FigureSpec("bars", x="held_out", hue="strategy", where=(("is_held_out", True),),
                        title="Held-out {source} performance by recalibration strategy",
                        xlabel="held-out {source} (never seen in training)")

    held_out: Sequence[str] | None = None
    sampler_mode: SamplerMode = "random"
    strategies: Sequence[str] = ("ema", "precise", "target", "prior:16")
    metrics: Sequence[str] = ("accuracy",)

    def axis_values(self, ds: SourceTaggedDataset) -> list[str]:
        return held_out_values(ds, self.held_out)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        sp, rest, model = fit_without(self.train, ds, value, seed, self.sampler_mode)
        table = cross_source_matrix(model, ds, self.strategies, self.metrics, calibration=(sp.calibration, sp.test),
                                    train_sources=rest, seed=seed, progress=False)
        table.insert(0, "held_out", value)
        table.insert(2, "is_held_out", table["eval_source"] == value)
        return table.assign(seed=seed, sampler_mode=self.sampler_mode)
