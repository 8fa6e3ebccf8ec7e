"""Batch composition: single-, mixed- or random-source training batches, and the statistics to test with."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import cross_source_matrix
from shiftbn.protocols.common import ModelSpec, as_seeds, fit


def _parse_mode(mode: str) -> tuple[str, int | None]:
    """``"random" | "single" | "mixed" | "mixed:k"`` -> sampler mode and sources per batch."""
    base, _, k = mode.partition(":")
    if base not in ("random", "single", "mixed") or (k and base != "mixed"):
        raise ValueError(f"unknown training mode {mode!r}; use random, single, mixed or mixed:k")
    return base, (int(k) if k else None)


def batch_composition(
    ds: SourceTaggedDataset,
    model: ModelSpec = "SmallCNN",
    *,
    modes: Sequence[str] = ("random", "single", "mixed", "mixed:2"),
    batch_sizes: Sequence[int] = (32,),
    strategies: Sequence[str] = ("source", "precise", "target", "per-source"),
    metrics: Sequence[str] = ("accuracy",),
    steps: int = 300,
    lr: float = 0.05,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seeds: int | Sequence[int] = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Train the same model with each batch composition and evaluate it under each statistics.

    Why: paper Section 5 — a model trained on single-source batches normalized each source
    separately, so it needs per-source statistics at test; pooled statistics (``precise``) hurt it.
    ``modes``: ``random``, ``single``, ``mixed`` (every source in every batch), ``mixed:k``.
    All sources are trained on (train splits) and evaluated on their test splits.
    Returns tidy rows: ``train_mode, batch_size, strategy, stats_source, eval_source, metric,
    value, n, seed``.
    """
    parsed = {m: _parse_mode(m) for m in modes}
    frames = []
    jobs = [(seed, m, b) for seed in as_seeds(seeds) for m in modes for b in batch_sizes]
    for seed, mode, bs in tqdm(jobs, desc="composition", disable=not progress, leave=False):
        sp = ds.split(fractions=fractions, seed=seed)
        base, k = parsed[mode]
        model_m = fit(model, sp.train, seed, steps=steps, batch_size=bs, mode=base, sources_per_batch=k, lr=lr,
                      progress=False)
        table = cross_source_matrix(model_m, ds, strategies, metrics, calibration=(sp.calibration, sp.test),
                                    seed=seed, progress=False)
        table.insert(0, "train_mode", mode)
        table.insert(1, "batch_size", bs)
        frames.append(table.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)
