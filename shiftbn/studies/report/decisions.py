"""The report's decision panels: which statistics for each site (chosen without labels) and drift per site.

Why: the matrix shows what each strategy did; a user deploying at a new site must pick one without
labels and watch the site over time. Both panels are computed from the demo's split and model, and
show the label-free answer beside the measured one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from shiftbn._torch import forward_batches
from shiftbn.data.tagged import SourceTaggedDataset, Splits
from shiftbn.sites import DriftMonitor, audit_samplers, builtin_samplers, choose_strategy
from shiftbn.studies.report.reading import plural

SITES_TITLE = "Which statistics for each {word}"
DRIFT_TITLE = "Drift of each {word} against the reference {word}"
DRIFT_LAYERS_TITLE = "Drift per layer (z against the reference's own variation)"
AUDIT_TITLE = "Batch-composition audit of the training sampler"


def site_choice_table(model: nn.Module, split: Splits, train_sources: Sequence[str], candidates: Sequence[str], *,
                      seed: int = 0) -> pd.DataFrame:
    """Per site: the strategy ``choose_strategy`` picks without the site's labels, its predicted and
    measured accuracy on the site's test split, and the measured best (oracle) for comparison.

    ATC is fitted on the test splits of the training sites other than the one chosen for.
    Returns ``site, in_training, chosen, predicted_accuracy, measured_accuracy, best, best_accuracy, regret``
    (regret in accuracy points).
    """
    rows = []
    for site in split.test.sources_present:
        labeled = [s for s in train_sources if s != site]
        kept: dict = {}
        t = choose_strategy(model, split.test, site, candidates, labeled=labeled,
                            calibration=(split.calibration, split.test), seed=seed, keep_outputs=kept)
        y = split.test.subset(site).labels
        measured = {name: float(np.mean(kept[name, site].argmax(axis=1) == y)) for name in t["strategy"]}
        pick = t.loc[t["chosen"]].iloc[0]
        best = max(measured, key=measured.get)
        rows.append({"site": site, "in_training": site in train_sources, "chosen": pick["strategy"],
                     "predicted_accuracy": pick["pred_accuracy"], "measured_accuracy": measured[pick["strategy"]],
                     "best": best, "best_accuracy": measured[best],
                     "regret": 100 * (measured[best] - measured[pick["strategy"]])})
    return pd.DataFrame(rows)


def drift_tables(model: nn.Module, split: Splits, reference: str, *, seed: int = 0,
                 n_null: int = 500) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A ``DriftMonitor`` fitted on ``reference``'s calibration split scores every site's test split (as a day).

    Returns ``(per site, per layer)``: ``site, n, score, p_value, alert, predicted_drop, measured_drop``
    (accuracy of the model as it is, the reference's test split minus the site's) and ``site, layer,
    depth, distance, null_q95, z, p_value``.
    """
    cal = split.calibration.subset(reference)
    monitor = DriftMonitor(model, cal, n_null=n_null, seed=seed)  # labels: the calibration split's own
    acc = {}
    for site in split.test.sources_present:
        part = split.test.subset(site)
        acc[site] = float(np.mean(forward_batches(model, part, 256).argmax(1).numpy() == part.labels))
    sites, layers = [], []
    for site in split.test.sources_present:
        r = monitor.score(split.test.subset(site))
        sites.append({"site": site, "n": r.n, "score": r.score, "p_value": r.p_value, "alert": r.alert,
                      "predicted_drop": r.predicted_drop, "measured_drop": acc[reference] - acc[site]})
        layers.append(r.layers.drop(columns=["null_mean"]).assign(site=site))
    per_layer = pd.concat(layers, ignore_index=True)
    return pd.DataFrame(sites), per_layer[["site", "layer", "depth", "distance", "null_q95", "z", "p_value"]]


def audit_table(ds: SourceTaggedDataset, batch_size: int, used: str, *, seed: int = 0) -> pd.DataFrame:
    """``audit_samplers``' verdicts for the built-in samplers over ``ds`` (the training data), the one
    the model was trained with (``used``, a ``SourceBatchSampler`` mode) marked in ``trained_with``.

    Returns ``sampler, trained_with, sites_per_batch, site_purity, label_leak, site_leak, statistics,
    verdict``.
    """
    samplers = builtin_samplers(ds, batch_size, seed)
    if used not in samplers:
        raise ValueError(f"the training sampler mode {used!r} is not one of the built-in ones {sorted(samplers)}")
    _, verdicts = audit_samplers(ds, samplers, seed=seed)
    verdicts.insert(1, "trained_with", verdicts["sampler"] == used)
    return verdicts


def decision_sections(sites: pd.DataFrame | None, drift: pd.DataFrame | None, drift_layers: pd.DataFrame | None,
                      reference: str | None = None, audit: pd.DataFrame | None = None, *, word: str = "source",
                      ) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The report's tables and captions for the panels (only those given); ``word``: what the data calls a
    source (``SITES_TITLE`` and ``DRIFT_TITLE`` are formatted with it)."""
    words = plural(word)
    tables: dict[str, pd.DataFrame] = {}
    captions: dict[str, str] = {}
    if sites is not None and len(sites):
        title = SITES_TITLE.format(word=word)
        tables[title] = sites
        captions[title] = (
            f"For each {word}, the strategy chosen from its unlabeled data alone (ATC predicted accuracy, fitted per "
            f"strategy on the other training {words}; strategies whose statistics are much farther from the "
            f"{word}'s than on any labeled {word} ranked last), its predicted and measured accuracy on the {word}'s "
            "test split, and the measured best strategy. Regret: accuracy points lost to the best.")
    if drift is not None and len(drift):
        title = DRIFT_TITLE.format(word=word)
        tables[title] = drift
        captions[title] = (
            f"A drift monitor fitted on {reference or f'the reference {word}'}'s calibration split scores every "
            f"{word}'s test split as one day: score = mean over BN layers of the W2 distance's z against the "
            "reference's own variation at the same sample size (bootstrap), p-value of that score, alert at "
            "p < 0.05. Predicted drop: ATC fitted on the reference; measured drop: the model's accuracy on the "
            f"reference's test split minus the {word}'s.")
    if drift_layers is not None and len(drift_layers):
        wide = drift_layers.pivot_table(index=["layer", "depth"], columns="site", values="z", sort=False)
        tables[DRIFT_LAYERS_TITLE] = wide.reset_index().sort_values("depth")
        captions[DRIFT_LAYERS_TITLE] = ("z of each layer's distance to the reference against the reference's own "
                                        "variation; the overall row is the mean over layers (the score).")
    if audit is not None and len(audit):
        tables[AUDIT_TITLE] = audit
        captions[AUDIT_TITLE] = (
            f"How much per-batch input statistics reveal each batch's {word} mix and label mix (a cross-validated "
            "probe on per-batch moments against the same probe on shuffled targets; a leak when the lower end of "
            "its 95% interval beats chance's 97.5% quantile by 0.05), for the sampler the model was trained with "
            "(trained_with) and the other built-in ones, and the test-time statistics that match each sampler "
            f"(paper Section 5: single-{word} batches want per-{word} statistics, mixed batches pooled ones).")
    return tables, captions
