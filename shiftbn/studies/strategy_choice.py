"""Label-free strategy choice, validated: leave one lab out, choose without its labels, compare with the oracle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.samplers import SamplerMode
from shiftbn.sites.choose import choose_strategy
from shiftbn.studies.base import FigureSpec, Study
from shiftbn.studies.common import fit_without, held_out_values


@dataclass(kw_only=True)
class StrategyChoice(Study):
    """For each held-out lab h: train on the others, let ``choose_strategy`` pick among ``candidates``
    for h from h's unlabeled data, and measure every candidate's true accuracy on h's test split.

    Why: a chooser is worth using only if it beats fixed rules on labs whose labels it never saw.
    Statistics come from h's calibration split, predictions (and the true accuracy) from its test
    split; ATC is fitted on the other labs' test splits (never the training data). ``score`` and
    ``range_factor``: as ``choose_strategy``.
    Rows (one per held-out lab, candidate and seed): ``held_out, strategy, stats_source, pred_accuracy,
    labeled_accuracy, atc_threshold, confidence, entropy, agreement, bn_distance, bn_distance_max,
    bn_distance_max_layer, labeled_distance, atc_site_error, in_range, n, rank, chosen, is_oracle,
    metric`` ("accuracy"), ``value`` (the true accuracy on h), ``seed``. ``choice_summary`` turns them into
    hit rate, regret and MAE.
    """

    name = "strategy_choice"
    axis = "held_out"
    figure = FigureSpec("bars", x="held_out", hue="strategy",
                        title="True accuracy of each candidate on the held-out {source}",
                        xlabel="held-out {source} (chosen for without its labels)")

    held_out: Sequence[str] | None = None
    candidates: Sequence[str] = ("ema", "precise", "target", "prior:16")
    score: str = "neg_entropy"
    range_factor: float = 2.0
    sampler_mode: SamplerMode = "random"

    def axis_values(self, ds: SourceTaggedDataset) -> list[str]:
        return held_out_values(ds, self.held_out)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        sp, rest, model = fit_without(self.train, ds, value, seed, self.sampler_mode)
        kept: dict = {}
        table = choose_strategy(model, ds, value, self.candidates, labeled=rest, calibration=(sp.calibration, sp.test),
                                score=self.score, range_factor=self.range_factor, seed=seed, keep_outputs=kept)
        y = sp.test.subset(value).labels
        table["value"] = [float(np.mean(kept[name, value].argmax(axis=1) == y)) for name in table["strategy"]]
        table["is_oracle"] = table["value"] == table["value"].max()
        table["metric"] = "accuracy"
        table = table.rename(columns={"site": "held_out"})
        return table.assign(seed=seed)


def choice_picks(table: pd.DataFrame) -> pd.DataFrame:
    """Each policy's pick per (seed, held-out lab), from ``StrategyChoice`` rows.

    Why: regret is a per-lab, per-seed number; its interval over seeds (and the paired difference
    between two policies) needs these rows, not only ``choice_summary``'s means. Policies as in
    ``choice_summary``. Returns one row per (policy, seed, held-out lab): ``policy, seed, held_out,
    strategy`` (the pick), ``value`` (the pick's true accuracy), ``regret`` (oracle accuracy minus the
    pick's, in accuracy points), ``hit`` (the pick is oracle-best; ties count).
    """
    items = []
    for (seed, lab), g in table.groupby(["seed", "held_out"], sort=True):
        best = g["value"].max()
        choices = {"chooser": g.loc[g["chosen"]].iloc[0],
                   "atc only": g.loc[g["pred_accuracy"].idxmax()],
                   "max confidence": g.loc[g["confidence"].idxmax()],
                   **{f"always {s}": g.loc[g["strategy"] == s].iloc[0] for s in g["strategy"]},
                   "oracle": g.loc[g["value"].idxmax()]}
        for policy, row in choices.items():
            items.append({"policy": policy, "seed": seed, "held_out": lab, "strategy": row["strategy"],
                          "value": row["value"], "regret": 100 * (best - row["value"]),
                          "hit": bool(row["value"] >= best)})
    return pd.DataFrame(items)


def choice_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Hit rate, regret and predicted-accuracy error of the chooser and of fixed rules, from ``StrategyChoice`` rows.

    Policies: ``chooser`` (the ``chosen`` row: range check, then ``pred_accuracy``), ``atc only`` (highest
    ``pred_accuracy``, no range check), ``max confidence``, ``always <strategy>`` for each candidate,
    ``oracle``. Per (seed, held-out lab):
    regret = oracle accuracy minus the pick's, in accuracy points; hit = the pick is oracle-best (ties
    count). Returns one row per policy: ``policy, hit_rate, regret_mean, regret_sd`` (sd over seeds of
    the per-seed mean), ``regret_max, n_cells``; and for ``chooser`` and ``atc only`` ``mae`` (mean
    |pred_accuracy - accuracy| over every candidate row, in points), else NaN. Per-cell picks:
    ``choice_picks``.
    """
    picks = choice_picks(table)
    mae = 100 * float((table["pred_accuracy"] - table["value"]).abs().mean())
    rows = []
    for policy, p in picks.groupby("policy", sort=False):
        per_seed = p.groupby("seed")["regret"].mean()
        rows.append({"policy": policy, "hit_rate": p["hit"].mean(), "regret_mean": p["regret"].mean(),
                     "regret_sd": per_seed.std(ddof=1) if len(per_seed) > 1 else float("nan"),
                     "regret_max": p["regret"].max(), "n_cells": len(p),
                     "mae": mae if policy in ("chooser", "atc only") else float("nan")})
    return pd.DataFrame(rows)
