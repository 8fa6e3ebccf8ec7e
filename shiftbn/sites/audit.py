"""Batch-composition audit: how much a sampler's per-batch statistics reveal each batch's label and site mix.

Why: BN normalizes a sample with statistics of its batch, so when batch statistics reveal the batch's
site (or label) mix, a network can read a sample's site (or label) through them (Wu & Johnson 2021,
Sections 5-6), and the statistics it needs at test time are those of batches composed the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from shiftbn._torch import iter_inputs
from shiftbn.bn import bn_layers, preserved
from shiftbn.bn.hooks import observe_bn_inputs
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate.uncertainty import resample_indices
from shiftbn.samplers import SourceBatchSampler

TARGETS = ("label", "site")
PROBE_METRICS = ("sample_accuracy", "r2")
PURE = 0.95  # mean largest-site share from which batches count as single-site
EVERY = 0.95  # share of batches holding every site from which batches count as fully mixed
STATISTICS = ("per-site", "pooled", "mixed")


@dataclass(frozen=True)
class BatchAudit:
    """The audit of one sampler.

    ``table``: tidy, one row per (target, metric): ``sampler, target, metric, value, low, high, chance,
    chance_low, chance_high, ceiling, beats_chance, n_batches, features`` (``ceiling``: the score if
    the batch mix were known exactly; for ``sample_accuracy`` the mean largest share of a batch).
    ``composition``: one row: ``sampler, n_batches, batch_size, sites_per_batch, site_purity,
    all_sites_share``.
    ``leaks``: target -> flagged. ``statistics``: the test-time BN statistics that match the sampler
    (paper Section 5): ``"per-site"`` (single-site batches), ``"pooled"`` (every site in every batch)
    or ``"mixed"`` (batches mixing some sites). ``verdict``: one line saying all of it.
    """

    table: pd.DataFrame
    composition: pd.DataFrame
    leaks: dict[str, bool]
    statistics: str
    verdict: str


def audit_batches(
    sampler: Iterable[list[int]],
    ds: SourceTaggedDataset,
    *,
    model: nn.Module | None = None,
    epochs: int = 4,
    n_splits: int = 5,
    n_permutations: int = 20,
    n_boot: int = 1000,
    margin: float = 0.05,
    name: str | None = None,
    seed: int = 0,
) -> BatchAudit:
    """Probe whether per-batch statistics reveal each batch's label mix and site mix.

    Why: a leak means the network can read a sample's site or label from its batch (paper Sections
    5-6); the sampler's composition also decides which test-time statistics match training.
    Features per batch: per-channel mean and log variance of the inputs (N, C, *) (C = features for
    (N, F)), plus those of the first BN layer's input of ``model`` when given (run in eval mode; the
    model is restored bit for bit). Targets: the batch's class and site proportions. Probe: a
    standardized degree-2 polynomial ridge (``RidgeCV``), out-of-fold over ``n_splits`` folds of
    batches. Metrics: ``sample_accuracy`` — each sample's class (site) guessed as the largest
    predicted proportion of its batch: what batch statistics tell about one sample; ``r2`` — the
    variance of the batch proportions explained (variance-weighted over classes; NaN when the mix
    never varies). Chance: the same probe on targets shuffled across batches, ``n_permutations``
    times. Rule: ``beats_chance`` when the lower end of the 95% bootstrap interval (``n_boot``
    resamples of batches) exceeds the chance distribution's 97.5% quantile by ``margin``; a target
    leaks when its ``sample_accuracy`` beats chance. ``epochs``: epochs of ``sampler`` to draw
    batches from (``set_epoch(0..epochs-1)`` when it has one; its epoch is put back).
    """
    if not isinstance(ds, SourceTaggedDataset):
        raise TypeError(f"ds must be a SourceTaggedDataset (sites per sample), got {type(ds).__name__}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(n_splits, int) or n_splits < 2:
        raise ValueError(f"n_splits must be an integer >= 2, got {n_splits!r}")
    if not isinstance(n_permutations, int) or n_permutations < 5:
        raise ValueError(f"n_permutations must be an integer >= 5 (the chance distribution), got {n_permutations!r}")
    name = name if name is not None else _sampler_name(sampler)
    batches = _draw(sampler, epochs)
    if len(batches) < 2 * n_splits:
        raise ValueError(f"{len(batches)} batches are too few for {n_splits}-fold cross-validation; raise epochs "
                         f"(now {epochs}) or lower the batch size")
    features, described = _features(ds, batches, model)
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    rows = []
    # Many tiny fits: one BLAS thread each (threads contending over 66x66 matrices made them 50x slower).
    with threadpool_limits(limits=1, user_api="blas"):
        for target, kseed in zip(TARGETS, np.random.SeedSequence(seed).spawn(len(TARGETS)), strict=True):
            counts = _target_counts(ds, batches, target)
            if counts is not None:
                rows += _probe_rows(target, features, counts, n_splits, n_permutations, n_boot, margin,
                                    int(kseed.generate_state(1)[0]))
    table = pd.DataFrame(rows)
    table.insert(0, "sampler", name)
    table["n_batches"] = len(batches)
    table["features"] = described
    composition = _composition(ds, batches, name)
    leaks = {t: bool(table.loc[(table["target"] == t) & (table["metric"] == "sample_accuracy"), "beats_chance"].any())
             for t in table["target"].unique()}
    statistics = _matching_statistics(composition.iloc[0])
    return BatchAudit(table, composition, leaks, statistics, _verdict(name, table, composition, leaks, statistics))


def audit_samplers(
    ds: SourceTaggedDataset,
    samplers: Mapping[str, Iterable[list[int]]] | None = None,
    *,
    batch_size: int = 32,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Audit several samplers over ``ds``: ``(table, verdicts)``.

    ``samplers``: name -> sampler; default ``builtin_samplers(ds, batch_size, seed)``. ``table``:
    every sampler's ``BatchAudit.table`` stacked. ``verdicts``: one row per sampler: ``sampler,
    sites_per_batch, site_purity, label_leak, site_leak, statistics, verdict``. ``kwargs`` go to
    ``audit_batches``.
    """
    samplers = builtin_samplers(ds, batch_size, seed) if samplers is None else samplers
    tables, rows = [], []
    for name, sampler in samplers.items():
        audit = audit_batches(sampler, ds, name=name, seed=seed, **kwargs)
        tables.append(audit.table)
        comp = audit.composition.iloc[0]
        rows.append({"sampler": name, "sites_per_batch": comp["sites_per_batch"], "site_purity": comp["site_purity"],
                     "label_leak": audit.leaks.get("label"), "site_leak": audit.leaks.get("site"),
                     "statistics": audit.statistics, "verdict": audit.verdict})
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)


def builtin_samplers(ds: SourceTaggedDataset, batch_size: int = 32, seed: int = 0) -> dict[str, SourceBatchSampler]:
    """The built-in ``SourceBatchSampler`` modes over ``ds``: ``random``, ``single``, ``mixed`` (every site
    in every batch) and ``mixed-2`` (two sites per batch, ``balance="equal"``; needs an even batch size)."""
    ids = ds.source_ids
    out = {mode: SourceBatchSampler(ids, batch_size, mode, seed=seed) for mode in ("random", "single", "mixed")}
    if len(np.unique(ids)) >= 2 and batch_size % 2 == 0:
        out["mixed-2"] = SourceBatchSampler(ids, batch_size, "mixed", sources_per_batch=2, balance="equal", seed=seed)
    return out


# --- batches and features ---------------------------------------------------------------------

def _sampler_name(sampler: Any) -> str:
    if isinstance(sampler, SourceBatchSampler):
        k = sampler.sources_per_batch
        return sampler.mode if k is None else f"{sampler.mode}-{k}"
    return type(sampler).__name__


def _draw(sampler: Iterable[list[int]], epochs: int) -> list[np.ndarray]:
    """The index batches of ``epochs`` epochs (drawn with ``set_epoch`` when the sampler has it)."""
    set_epoch = getattr(sampler, "set_epoch", None)
    saved = getattr(sampler, "epoch", None)
    out = []
    try:
        for e in range(epochs):
            if set_epoch is not None:
                set_epoch(e)
            out += [np.asarray(list(b), dtype=np.int64) for b in sampler]
    finally:
        if set_epoch is not None and saved is not None:
            set_epoch(saved)
    out = [b for b in out if len(b) >= 2]
    if not out:
        raise ValueError("the sampler yielded no batch of 2 or more samples; batch statistics need several")
    return out


def _moments(x: torch.Tensor) -> np.ndarray:
    """Per-channel mean and log variance of a batch (N, C, *), float64 (2C,)."""
    xd = x.detach().double().reshape(x.shape[0], x.shape[1] if x.dim() > 1 else 1, -1)
    mean = xd.mean(dim=(0, 2))
    var = xd.var(dim=(0, 2), unbiased=False)
    return torch.cat([mean, torch.log(var + 1e-12)]).cpu().numpy()


def _features(ds: SourceTaggedDataset, batches: list[np.ndarray], model: nn.Module | None) -> tuple[np.ndarray, str]:
    """Per-batch features (B, F) and what they are."""
    rows = []
    if model is None:
        for x in iter_inputs(ds, batches):
            rows.append(_moments(x))
        return np.stack(rows), "input"
    first = bn_layers(model)[0]
    seen: list[torch.Tensor] = []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with preserved(model), torch.no_grad():
        model.eval()
        # the forward stops once the first BN layer has seen its input
        with observe_bn_inputs(model, [first], lambda layer, k, x: seen.append(x), stop_after=first.name) as hooks:
            for x in iter_inputs(ds, batches):
                seen.clear()
                hooks.run(x.to(device))
                if not seen:
                    raise ValueError(f"the model's first BN layer {first.name!r} never ran on a batch")
                rows.append(np.concatenate([_moments(x), _moments(seen[0])]))
    return np.stack(rows), f"input+bn:{first.name}"


def _target_counts(ds: SourceTaggedDataset, batches: list[np.ndarray], target: str) -> np.ndarray | None:
    """Per batch, the number of samples of each class or site (B, K); ``None`` for an unlabeled ``label``."""
    if target == "label":
        if ds.labels is None:
            return None
        values, k = ds.labels, int(ds.labels.max()) + 1
        if values.min() < 0:
            keep = values >= 0
            values = np.where(keep, values, 0)
            return np.stack([np.bincount(values[b][keep[b]], minlength=k) for b in batches]).astype(np.float64)
    else:
        values, k = ds.source_ids, len(ds.source_names)
    return np.stack([np.bincount(values[b], minlength=k) for b in batches]).astype(np.float64)


# --- the probe --------------------------------------------------------------------------------

def _probe():
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    return make_pipeline(StandardScaler(), PolynomialFeatures(2), RidgeCV(alphas=np.logspace(-4, 4, 17)))


def _out_of_fold(features: np.ndarray, y: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import KFold

    pred = np.empty_like(y)
    for train, test in KFold(n_splits, shuffle=True, random_state=seed).split(features):
        pred[test] = _probe().fit(features[train], y[train]).predict(features[test])
    return pred


def _scores(pred: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample accuracy and variance-weighted R^2 for each row of batch indices ``idx`` (R, B')."""
    y = counts / counts.sum(1, keepdims=True).clip(min=1)
    hits = counts[np.arange(len(counts)), pred.argmax(1)]
    acc = hits[idx].sum(1) / counts.sum(1)[idx].sum(1).clip(min=1)
    sse = ((pred - y) ** 2).sum(1)[idx].sum(1)
    yb = y[idx]  # (R, B', K)
    sst = ((yb - yb.mean(1, keepdims=True)) ** 2).sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 1e-12, 1 - sse / sst, np.nan)
    return acc, r2


def _probe_rows(target, features, counts, n_splits, n_permutations, n_boot, margin, seed) -> list[dict]:
    """Rows of one target: the probe's scores with intervals against the shuffled-target chance."""
    rng = np.random.default_rng(seed)
    whole = np.arange(len(counts))[None]
    y = counts / counts.sum(1, keepdims=True).clip(min=1)
    pred = _out_of_fold(features, y, n_splits, seed)
    value = _scores(pred, counts, whole)
    boot = _scores(pred, counts, resample_indices(len(counts), n_boot, seed))
    null = []
    for _ in range(n_permutations):
        perm = rng.permutation(len(counts))
        null.append(_scores(_out_of_fold(features, y[perm], n_splits, seed), counts[perm], whole))
    ceilings = {"sample_accuracy": float(counts.max(1).sum() / max(counts.sum(), 1)), "r2": 1.0}
    rows = []
    for k, metric in enumerate(PROBE_METRICS):
        chance = np.array([n[k][0] for n in null])
        v, b = float(value[k][0]), boot[k][np.isfinite(boot[k])]
        low, high = (np.quantile(b, [0.025, 0.975]) if len(b) else (np.nan, np.nan))
        c_low, c_high = (np.quantile(chance[np.isfinite(chance)], [0.025, 0.975])
                         if np.isfinite(chance).any() else (np.nan, np.nan))
        rows.append({"target": target, "metric": metric, "value": v, "low": float(low), "high": float(high),
                     "chance": float(np.nanmean(chance)) if np.isfinite(chance).any() else np.nan,
                     "chance_low": float(c_low), "chance_high": float(c_high),
                     "ceiling": ceilings[metric],
                     "beats_chance": bool(np.isfinite(low) and np.isfinite(c_high) and low > c_high + margin)})
    return rows


# --- composition and verdict ------------------------------------------------------------------

def _composition(ds: SourceTaggedDataset, batches: list[np.ndarray], name: str) -> pd.DataFrame:
    counts = _target_counts(ds, batches, "site")
    share = counts / counts.sum(1, keepdims=True)
    present = len(np.unique(ds.source_ids))
    return pd.DataFrame([{
        "sampler": name, "n_batches": len(batches), "batch_size": float(np.mean([len(b) for b in batches])),
        "sites_per_batch": float((counts > 0).sum(1).mean()), "site_purity": float(share.max(1).mean()),
        "all_sites_share": float(((counts > 0).sum(1) == present).mean()),
    }])


def _matching_statistics(comp: pd.Series) -> str:
    """Which test-time statistics match batches of this composition (see ``STATISTICS``)."""
    if comp["site_purity"] >= PURE:
        return "per-site"
    return "pooled" if comp["all_sites_share"] >= EVERY else "mixed"


_ADVICE = {
    "per-site": "per-site (single-site batches: per_site_model, or strategy 'per-source'/'target')",
    "pooled": "pooled over the sites (every batch mixes all sites: strategy 'precise')",
    "mixed": "mixed (batches mix some sites: test batches mixed the same way, strategy 'batch:B:mixed'; pooled "
             "'precise' is the nearest population statistic; per-site would mismatch)",
}


def _verdict(name: str, table: pd.DataFrame, composition: pd.DataFrame, leaks: dict[str, bool],
             statistics: str) -> str:
    comp = composition.iloc[0]
    parts = [f"{name}: batches hold {comp['sites_per_batch']:.1f} site(s) (purity {comp['site_purity']:.2f})"]
    for target in leaks:
        row = table[(table["target"] == target) & (table["metric"] == "sample_accuracy")].iloc[0]
        parts.append(f"{target} {'LEAKS' if leaks[target] else 'does not leak'} (a sample's {target} guessed from "
                     f"its batch: {row['value']:.2f} [{row['low']:.2f}, {row['high']:.2f}] vs chance "
                     f"{row['chance_high']:.2f})")
    parts.append(f"test-time statistics: {_ADVICE[statistics]}")
    return "; ".join(parts)
