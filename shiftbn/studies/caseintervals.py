"""Means of per-case study rows with two-level (seeds, then cases) bootstrap intervals, and paired effects.

Why: a segmentation cell is a mean over cases, and its noise has two levels: which seed trained the
model (split, initialisation, batch order) and which cases were scored. Each replicate resamples
the seeds with replacement and, within every (seed, group) — a group is one held-out site and one
evaluated site — the cases with replacement; a difference between two strategies resamples the same
cases for both (paired), so it is not widened by the spread between cases that both share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from shiftbn.evaluate.uncertainty import supports_difference
from shiftbn.studies.intervals import check_rows

GROUP = ("held_out", "eval_source")


def _two_level(rows: pd.DataFrame, within: Sequence[str], n_boot: int, level: float,
               rng: np.random.Generator) -> dict:
    """Mean over seeds of the mean over groups of the case mean; std over seeds; bootstrap interval."""
    seeds = sorted(rows["seed"].unique())
    points, reps = [], []
    for s in seeds:
        part = rows[rows["seed"] == s]
        g_points, g_reps = [], []
        for _, g in part.groupby(list(within), sort=True) if within else [((), part)]:
            v = g["value"].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if not len(v):
                continue
            g_points.append(v.mean())
            g_reps.append(v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1))
        points.append(np.mean(g_points) if g_points else np.nan)
        reps.append(np.mean(g_reps, axis=0) if g_reps else np.full(n_boot, np.nan))
    points, reps = np.asarray(points), np.stack(reps)
    pick = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    boot = reps[pick, np.arange(n_boot)[:, None]].mean(axis=1)
    low, high = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(np.mean(points)), "std": float(np.std(points, ddof=1)) if len(seeds) > 1 else 0.0,
            "low": float(low), "high": float(high), "n": int(np.isfinite(rows["value"]).sum()),
            "seeds": len(seeds)}


def case_intervals(rows: pd.DataFrame, by: Sequence[str], *, within: Sequence[str] = GROUP, n_boot: int = 2000,
                   level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per cell of ``by``: ``mean, std, low, high, n, seeds`` of per-case ``value`` rows.

    Why: the table of a per-case study (``SegHeldOutSites``) as means with intervals that hold both
    the seed and the case noise.

    Args:
        rows: tidy per-case rows with ``seed``, ``value`` and the ``by`` and ``within`` columns.
        by: the columns of a cell (e.g. ``["mode", "strategy", "metric"]``).
        within: the columns of a group inside a seed (default held-out site and evaluated site,
            those present); a seed's value is the mean over its groups of each group's case mean.
        n_boot: bootstrap replicates; ``level``: the interval's coverage; ``seed``: the resampling's.

    Returns:
        DataFrame ``by..., mean, std, low, high, n, seeds`` (``std``: over seeds; ``n``: case rows).

    Example:
        >>> rows = pd.DataFrame({"seed": [0, 0, 1, 1], "strategy": "ema", "value": [0.5, 0.7, 0.6, 0.8]})
        >>> case_intervals(rows, ["strategy"], within=(), n_boot=200)[["strategy", "mean", "n", "seeds"]]
          strategy  mean  n  seeds
        0      ema  0.65  4      2
    """
    _check(rows, by, n_boot, level)
    rng = np.random.default_rng(seed)
    within = [c for c in within if c in rows.columns and c not in by]
    out = []
    for key, g in rows.groupby(list(by), sort=True):
        keys = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, keys, strict=True)), **_two_level(g, within, int(n_boot), level, rng)})
    return pd.DataFrame(out)


def paired_case_effects(rows: pd.DataFrame, by: Sequence[str], column: str, a: object, b: object, *,
                        within: Sequence[str] = GROUP, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Per cell of ``by``: the effect A - B, paired by seed and case (A: rows with ``column == a``).

    Why: a strategy "differs" from another only when the interval of their paired difference excludes
    0; both are scored on the same cases of the same trained models, so the difference is taken case
    by case before resampling.

    Args:
        rows: tidy per-case rows with ``seed``, ``case``, ``value``, ``column`` and the ``by`` and
            ``within`` columns.
        by: the columns of a cell; ``column``: the column that tells A from B (e.g. ``"strategy"``).
        a, b: the values of ``column`` for A and B.
        within, n_boot, level, seed: as ``case_intervals``'s.

    Returns:
        DataFrame ``by..., effect, std, low, high, n, seeds, supported`` (``supported``: the interval
        excludes 0); cases missing A or B are dropped.

    Raises:
        ValueError: a column is missing, or A or B repeat for one (cell, group, seed, case).

    Example:
        >>> rows = pd.DataFrame({"seed": 0, "case": [0, 1, 0, 1], "strategy": ["a", "a", "b", "b"],
        ...                      "value": [0.9, 0.8, 0.5, 0.6]})
        >>> paired_case_effects(rows, [], "strategy", "a", "b", n_boot=200)[["effect", "supported"]].round(2)
           effect  supported
        0     0.3       True
    """
    _check(rows, [*by, column, "case"], n_boot, level)
    rng = np.random.default_rng(seed)
    within = [c for c in within if c in rows.columns and c not in by and c != column]
    keys = [*by, *within, "seed", "case"]
    pa = rows[rows[column] == a].set_index(keys)["value"]
    pb = rows[rows[column] == b].set_index(keys)["value"]
    for side, part in ((a, pa), (b, pb)):
        if part.index.has_duplicates:
            raise ValueError(f"rows with {column} == {side!r} repeat for one {keys}; filter them first or add the "
                             "column that tells them apart (e.g. stream, mode) to by")
    diff = (pa - pb).dropna().rename("value").reset_index()
    out = []
    groups = diff.groupby(list(by), sort=True) if by else [((), diff)]
    for key, g in groups:
        if not len(g):
            continue
        keys_ = key if isinstance(key, tuple) else (key,)
        r = _two_level(g, within, int(n_boot), level, rng)
        out.append({**dict(zip(by, keys_, strict=True)), "effect": r["mean"], "std": r["std"], "low": r["low"],
                    "high": r["high"], "n": r["n"], "seeds": r["seeds"],
                    "supported": supports_difference(r["low"], r["high"])})
    return pd.DataFrame(out, columns=[*by, "effect", "std", "low", "high", "n", "seeds", "supported"])


def _check(rows: pd.DataFrame, keys: Sequence[str], n_boot: int, level: float) -> None:
    check_rows(rows, keys, n_boot, level, have="per-case study rows have 'seed', 'case' and 'value'")
