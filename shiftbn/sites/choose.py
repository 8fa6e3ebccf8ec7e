"""Label-free strategy choice for one site: rank candidate statistics by a predicted accuracy.

Why: a new site's labels are what its users do not have; TTAB calls model selection for test-time
adaptation "exceedingly difficult". Each candidate is scored on the site's unlabeled data (ATC
predicted accuracy, confidence, entropy, agreement with the other candidates, BN-statistic
distance) with ATC fitted on the labeled sites evaluated under that same candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from shiftbn._forward import Forward
from shiftbn.adapt import AdaptContext, Strategy
from shiftbn.bn import BNStats, PopulationStats, buffer_stats, split_site
from shiftbn.bn.shift import w2
from shiftbn.data.tagged import SourceTaggedDataset, Splits
from shiftbn.evaluate.matrix import Calibration, checked_outputs, collect, prepare
from shiftbn.sites.atc import ATC, confidence_scores, fit_atc

DEFAULT_CANDIDATES = ("ema", "precise", "target", "prior:16")


def choose_strategy(
    model: nn.Module,
    ds: SourceTaggedDataset,
    site: str,
    candidates: Sequence[str | Strategy] = DEFAULT_CANDIDATES,
    *,
    labeled: Sequence[str] | None = None,
    calibration: Calibration = 0.5,
    score: str = "neg_entropy",
    range_factor: float = 2.0,
    batch_size: int = 256,
    stats_batch_size: int = 64,
    seed: int = 0,
    amp: bool = False,
    progress: bool = False,
    keep_outputs: dict | None = None,
    forward: Forward | None = None,
) -> pd.DataFrame:
    """Rank ``candidates`` for ``site`` without its labels; the top one is ``chosen``.

    Why: ATC (Garg et al. 2022) predicts accuracy from unlabeled data once a confidence threshold is
    fitted on labeled data; fitted per candidate on the labeled sites under that candidate, it
    ranks candidates on the new site. The site's labels are masked before anything is computed.
    Measured (analyses/README.md §7a, §11d): it rules bad candidates out but has not beaten the best
    fixed rule ("always prior:16" or "always target"), and on real shift it lost to it by 11.7 points;
    ``shiftbn report`` measures both on the labeled sites and recommends the better.

    Args:
        model: the trained network (not changed).
        ds: a ``SourceTaggedDataset`` holding ``site`` (labels unused, may be -1) and labeled sites.
            The labeled sites' samples must be held out from the model's training data (ATC fitted
            on training samples would be overconfident).
        site: the site to choose for.
        candidates: strategy specs or objects (``"ema"``, ``"target"``, ``"prior:16"``...).
        labeled: the labeled sites (default: every other site of ``ds``); ``precise`` pools them.
        calibration: as ``cross_source_matrix``: a fraction of each site, a ``Splits`` or a
            ``(calibration, eval)`` pair; statistics come from the calibration part, predictions and
            ATC from the eval part.
        score: ATC's confidence score, ``"neg_entropy"`` (ATC-NE) or ``"confidence"`` (max softmax).
        range_factor: a candidate whose ``bn_distance`` on the site exceeds ``range_factor`` times the
            largest it has on a labeled site is ``out_of_range`` and ranked after every in-range one:
            ATC was fitted where the normalization matched the data this well, and collapsed outputs
            (stored statistics far from the site's) are confidently wrong, which ATC cannot see.
        keep_outputs: a dict filled with ``(strategy, source) -> (N, K)`` logits of the eval parts.
        forward: ``forward(model, x) -> logits`` for a model that is not called as ``model(x)`` (as
            ``cross_source_matrix``'s).

    Returns:
        One row per candidate: ``site, strategy, stats_source, pred_accuracy`` (ATC, fraction in [0, 1]),
        ``labeled_accuracy`` (the candidate on the labeled sites), ``atc_threshold, confidence``
        (mean max softmax), ``entropy`` (mean, nats), ``agreement`` (mean fraction of equal
        predictions with each other candidate), ``bn_distance`` (mean over layers of the W2 distance
        between the statistics the candidate normalizes with and the site's own; NaN for strategies
        without fixed statistics), ``bn_distance_max, bn_distance_max_layer, n, rank, chosen``.
    """
    site = str(site)
    ds.source_id(site)
    labeled = [s for s in ds.sources_present if s != site] if labeled is None else [str(s) for s in labeled]
    if site in labeled:
        raise ValueError(f"site {site!r} is also in labeled; the chosen site's labels are never used")
    if not labeled:
        raise ValueError("choose_strategy needs at least one labeled site besides the chosen one")
    if not range_factor > 0:
        raise ValueError(f"range_factor must be > 0, got {range_factor!r}")
    if isinstance(calibration, Splits):
        calibration = (calibration.calibration, calibration.test)
    if isinstance(calibration, tuple):
        cal: Calibration = tuple(_masked(part, site) for part in calibration)
        data = cal[1]
    else:
        cal, data = calibration, _masked(ds, site)
    plan = prepare(data, candidates, calibration=cal, train_sources=labeled, eval_sources=[site, *labeled], seed=seed)
    ctx, labels = collect(model, plan, batch_size=batch_size, stats_batch_size=stats_batch_size, seed=seed, amp=amp,
                          progress=progress, forward=forward)
    for s in labeled:
        if (labels[s] < 0).any():
            raise ValueError(f"labeled site {s!r} has unlabeled samples (label -1); give labels or leave it out")
    outs = _outputs(ctx, plan.strategies, [site, *labeled])
    if keep_outputs is not None:
        keep_outputs.update(outs)
    rows = []
    for st in plan.strategies:
        atc = fit_atc(np.concatenate([outs[st.name, s] for s in labeled]),
                      np.concatenate([labels[s] for s in labeled]), score)
        row = _row(ctx, st, site, outs, atc, plan.strategies)
        row["atc_site_error"] = _loso_error(outs, labels, st.name, labeled, score)
        row["labeled_distance"] = max((_mean(site_distances(ctx, st, s)) for s in labeled), default=float("nan"))
        row["in_range"] = not row["bn_distance"] > range_factor * row["labeled_distance"] + 1e-12
        rows.append(row)
    return _ranked(pd.DataFrame(rows))


def _loso_error(outs: dict, labels: dict, name: str, labeled: list[str], score: str) -> float:
    """Mean |ATC error| of strategy ``name`` across labeled sites, each predicted by ATC fitted on the others
    (NaN with one labeled site): how far ATC's accuracy misses on a site it was not fitted on."""
    if len(labeled) < 2:
        return float("nan")
    errs = []
    for j in labeled:
        rest = [s for s in labeled if s != j]
        atc = fit_atc(np.concatenate([outs[name, s] for s in rest]), np.concatenate([labels[s] for s in rest]), score)
        errs.append(abs(atc.predict(outs[name, j]) - float(np.mean(outs[name, j].argmax(axis=1) == labels[j]))))
    return float(np.mean(errs))


def _masked(ds: SourceTaggedDataset, site: str) -> SourceTaggedDataset:
    """A view of ``ds`` whose samples of ``site`` carry label -1 (never read, not even to stratify)."""
    view = ds.take(np.arange(len(ds)))
    if view.labels is not None:
        view.labels = view.labels.copy()
        view.labels[view.source_ids == view.source_id(site)] = -1
    return view


def _outputs(ctx: AdaptContext, strategies: list[Strategy], sources: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """Logits of every (strategy, source), computed once per cache key."""
    done: dict = {}
    outs = {}
    for st in strategies:
        for s in sources:
            key = st.cache_key(ctx, s)
            if key is not None and key in done:
                outs[st.name, s] = done[key]
                continue
            outs[st.name, s] = checked_outputs(st, s, st.logits(ctx, s, ctx.eval_inputs(s)))
            if key is not None:
                done[key] = outs[st.name, s]
    return outs


def _row(ctx: AdaptContext, st: Strategy, site: str, outs: dict, atc: ATC, strategies: list[Strategy]) -> dict:
    out = outs[st.name, site]
    pred = out.argmax(axis=1)
    others = [outs[o.name, site].argmax(axis=1) for o in strategies if o.name != st.name]
    dist = site_distances(ctx, st, site)
    worst = max(dist, key=dist.get) if dist else None
    return {"site": site, "strategy": st.name, "stats_source": st.stats_source(ctx, site),
            "pred_accuracy": atc.predict(out), "labeled_accuracy": atc.accuracy, "atc_threshold": atc.threshold,
            "confidence": float(confidence_scores(out, "confidence").mean()),
            "entropy": float(-confidence_scores(out, "neg_entropy").mean()),
            "agreement": float(np.mean([np.mean(pred == o) for o in others])) if others else 1.0,
            "bn_distance": _mean(dist),
            "bn_distance_max": dist[worst] if worst else float("nan"), "bn_distance_max_layer": worst,
            "n": len(out)}


def site_distances(ctx: AdaptContext, st: Strategy, site: str) -> dict[str, float]:
    """Per BN layer, the W2 distance (activation units) between the statistics ``st`` normalizes ``site``
    with and the site's own calibration statistics; empty for strategies without fixed statistics."""
    try:
        stats = st.bn_stats(ctx, site)
    except NotImplementedError:
        return {}
    if stats is None:
        stats = buffer_stats(ctx.model)
    own = ctx.source_stats(site)
    return {k: float(w2(*_mv(stats, k), *_mv(own, k))) for k in own.layers
            if split_site(k)[1] is None and k in stats.layers}


def _mean(dist: dict[str, float]) -> float:
    return float(np.mean(list(dist.values()))) if dist else float("nan")


def _mv(stats: BNStats | PopulationStats, layer: str) -> tuple[np.ndarray, np.ndarray]:
    entry = stats.layers[layer]
    return entry.mean, entry.var


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Rank in-range candidates first, then by predicted accuracy, then agreement (ties); rank 1 is ``chosen``."""
    order = table.sort_values(["in_range", "pred_accuracy", "agreement"], ascending=False, kind="stable").index
    table["rank"] = 0
    table.loc[order, "rank"] = np.arange(1, len(table) + 1)
    table["chosen"] = table["rank"] == 1
    return table
