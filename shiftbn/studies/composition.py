"""Batch composition: single-, mixed- or random-source training batches, and the statistics to test with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import cross_source_matrix
from shiftbn.studies.base import FigureSpec, Study
from shiftbn.studies.common import fit


def _parse_mode(mode: str) -> tuple[str, int | None]:
    """``"random" | "single" | "mixed" | "mixed:k"`` -> sampler mode and sources per batch."""
    base, _, k = mode.partition(":")
    if base not in ("random", "single", "mixed") or (k and base != "mixed") or (k and not k.isdigit()):
        raise ValueError(f"unknown training mode {mode!r}; use random, single, mixed or mixed:k")
    return base, (int(k) if k else None)


@dataclass(kw_only=True)
class BatchComposition(Study):
    """Train the same model with each batch composition and evaluate it under each statistics.

    Why: paper Section 5 — a model trained on single-source batches normalized each source
    separately, so it needs per-source statistics at test; pooled statistics (``precise``) hurt it.
    ``modes``: ``random``, ``single``, ``mixed`` (every source in every batch), ``mixed:k``; each
    is trained with every size in ``batch_sizes`` (``train.batch_size`` is not used). All sources
    are trained on (train splits) and evaluated on their test splits.
    Rows: ``train_mode, batch_size, strategy, is_cross_source, stats_source, eval_source, metric,
    value, n, seed``.
    """

    name = "batch_composition"
    axis = "modes"
    figure = FigureSpec("bars", x="train_mode", hue="strategy", col="batch_size",
                        title="Training batch composition x test statistics")

    modes: Sequence[str] = ("random", "single", "mixed", "mixed:2")
    batch_sizes: Sequence[int] = (32,)
    strategies: Sequence[str] = ("ema", "precise", "target", "per-source")
    metrics: Sequence[str] = ("accuracy",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for m in self.modes:
            _parse_mode(m)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        base, k = _parse_mode(value)
        frames = []
        for bs in self.batch_sizes:
            sp = ds.split(fractions=self.train.fractions, seed=seed)
            model = fit(self.train, sp.train, seed, batch_size=bs, mode=base, sources_per_batch=k)
            table = cross_source_matrix(model, ds, self.strategies, self.metrics,
                                        calibration=(sp.calibration, sp.test), seed=seed, progress=False)
            table.insert(0, "train_mode", value)
            table.insert(1, "batch_size", bs)
            frames.append(table.assign(seed=seed))
        return pd.concat(frames, ignore_index=True)
