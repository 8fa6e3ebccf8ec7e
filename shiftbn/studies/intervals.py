"""Study tables with their spread over seeds and a bootstrap interval, and paired effects between cells.

Why: a study's finding is the difference between two cells (target vs the stored EMA statistics, own batches
vs population statistics); it is reproduced only when that difference's interval excludes zero.
Two sources of noise matter: which seed trained the model (the split, the initialisation, the batch
order) and which test samples were scored. The interval is a two-level percentile bootstrap: each
replicate resamples the seeds with replacement and, for accuracy rows with a sample count ``n``,
redraws each value as ``Binomial(n, value) / n`` (test-sample noise); rows without ``n`` keep their
value, so the interval then reflects seeds only. With 3 seeds the seed level is coarse (27 resamples);
read the interval together with the seed count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from shiftbn.evaluate.uncertainty import supports_difference

SUMMARY_COLUMNS = ("mean", "std", "low", "high", "seeds")


def _cell_arrays(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per seed, the values and counts of its rows padded to one width: (seeds,), (S, R), (S, R).

    Counts are NaN where a row is not an accuracy with a positive count (its value is then kept).
    """
    seeds = np.array(sorted(g["seed"].unique()))
    parts = [g[g["seed"] == s] for s in seeds]
    width = max(len(p) for p in parts)
    values = np.full((len(seeds), width), np.nan)
    counts = np.full((len(seeds), width), np.nan)
    for i, p in enumerate(parts):
        values[i, : len(p)] = p["value"].to_numpy(dtype=float)
        if "n" in p and "metric" in p:
            n = pd.to_numeric(p["n"], errors="coerce").to_numpy(dtype=float)
            ok = (p["metric"].to_numpy() == "accuracy") & np.isfinite(n) & (n > 0)
            counts[i, : len(p)] = np.where(ok, n, np.nan)
    return seeds, values, counts


def _replicate_seed_means(values: np.ndarray, counts: np.ndarray, idx: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """(B, S') per-seed cell values for seed draws ``idx`` (B, S'), test-sample noise redrawn."""
    v, n = values[idx], counts[idx]
    redraw = np.isfinite(n) & np.isfinite(v)
    if redraw.any():
        drawn = rng.binomial(np.where(redraw, n, 1).astype(np.int64), np.clip(np.where(redraw, v, 0.0), 0, 1))
        v = np.where(redraw, drawn / np.where(redraw, n, 1), v)
    return np.nanmean(v, axis=-1)


def seed_intervals(rows: pd.DataFrame, by: Sequence[str], *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> pd.DataFrame:
    """One row per cell of ``by``: mean over seeds, std over seeds, bootstrap ``low``/``high``, ``seeds``.

    ``rows``: tidy study rows with ``seed`` and ``value`` (and optionally ``metric``, ``n``); a seed's
    value in a cell is the mean of its rows there (e.g. over labs). ``level``: interval coverage.
    """
    check_rows(rows, by, n_boot, level)
    rng = np.random.default_rng(seed)
    out = []
    for key, g in rows.groupby(list(by), sort=True):
        seeds, values, counts = _cell_arrays(g)
        per_seed = np.nanmean(values, axis=1)
        idx = rng.integers(0, len(seeds), size=(int(n_boot), len(seeds)))
        reps = _replicate_seed_means(values, counts, idx, rng).mean(axis=1)
        low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                    "mean": per_seed.mean(), "std": per_seed.std(ddof=1) if len(seeds) > 1 else 0.0,
                    "low": low, "high": high, "seeds": len(seeds)})
    return pd.DataFrame(out)


def paired_effects(rows: pd.DataFrame, by: Sequence[str], column: str, a: object, b: object, *,
                   n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per cell of ``by``: the effect mean(A) - mean(B), A the rows with ``column == a``, B with ``b``.

    Paired by seed (a seed's A and B come from one trained model or one split); the bootstrap resamples
    the same seeds for A and B and redraws their test-sample noise independently (conservative: it
    ignores that A and B score the same samples). Returns ``by..., effect, std, low, high, seeds,
    supported`` (``supported``: the interval excludes 0). Seeds missing A or B are dropped.
    """
    check_rows(rows, [*by, column], n_boot, level)
    rng = np.random.default_rng(seed)
    out = []
    groups = rows.groupby(list(by), sort=True) if by else [((), rows)]
    for key, g in groups:
        ga, gb = g[g[column] == a], g[g[column] == b]
        common = sorted(set(ga["seed"]) & set(gb["seed"]))
        if not common:
            continue
        sa, va, na = _cell_arrays(ga[ga["seed"].isin(common)])
        sb_, vb, nb = _cell_arrays(gb[gb["seed"].isin(common)])
        per_seed = np.nanmean(va, axis=1) - np.nanmean(vb, axis=1)
        idx = rng.integers(0, len(common), size=(int(n_boot), len(common)))
        reps = (_replicate_seed_means(va, na, idx, rng) - _replicate_seed_means(vb, nb, idx, rng)).mean(axis=1)
        low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
        keys = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, keys, strict=True)), "effect": per_seed.mean(),
                    "std": per_seed.std(ddof=1) if len(common) > 1 else 0.0, "low": low, "high": high,
                    "seeds": len(common), "supported": supports_difference(low, high)})
    return pd.DataFrame(out)


def format_interval(mean: float, std: float, low: float, high: float, digits: int = 3) -> str:
    """``"mean ± std [low, high]"``, e.g. ``0.893 ± 0.027 [0.861, 0.921]``."""
    f = f".{digits}f"
    return f"{mean:{f}} ± {std:{f}} [{low:{f}}, {high:{f}}]"


def interval_table(rows: pd.DataFrame, index: Sequence[str], columns: Sequence[str], **kwargs) -> pd.DataFrame:
    """``seed_intervals`` over ``index + columns`` as a wide table of ``format_interval`` strings."""
    cells = seed_intervals(rows, [*index, *columns], **kwargs)
    text = pd.Series([format_interval(r.mean, r.std, r.low, r.high) for r in cells.itertuples()],
                     index=pd.MultiIndex.from_frame(cells[[*index, *columns]]))
    return text.unstack(list(range(len(index), len(index) + len(columns))))


def check_rows(rows: pd.DataFrame, keys: Sequence[str], n_boot: int, level: float,
               have: str = "study rows have 'seed' and 'value' plus their keys") -> None:
    """Refuse rows without the columns an interval needs, an empty table, a level outside (0, 1), n_boot < 10."""
    missing = sorted({"seed", "value", *keys} - set(rows.columns))
    if missing:
        raise ValueError(f"rows lack column(s) {missing}; {have}")
    if len(rows) == 0:
        raise ValueError("rows is empty; give the rows of at least one seed")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    if int(n_boot) < 10:
        raise ValueError(f"n_boot must be at least 10 resamples; got {n_boot!r}")
