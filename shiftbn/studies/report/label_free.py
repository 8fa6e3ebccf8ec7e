"""What the report can say about a site without labels: shift, label-free indicators, drift, a chosen strategy.

Why: a new site rarely comes with labels, and a number that needs them (accuracy, ECE, recall) must
not be printed for it. What needs none is shown instead: the per-layer shift of its BN statistics,
per strategy the outputs' own indicators (agreement with the model's statistics, entropy,
confidence, predicted-class mix), ATC's accuracy estimate only beside the error it made on labeled
sites left out one at a time, the drift test against the training sites, and a pick: ``choose_strategy``'s,
or the fixed rule ("always target") that lost less than the chooser when each labeled site was treated as
unlabeled in turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.sites import DriftMonitor, choose_strategy
from shiftbn.sites.atc import confidence_scores
from shiftbn.studies.report.reading import plural


@dataclass
class Validation:
    """How ``choose_strategy`` and ATC did on the labeled sites, each treated as unlabeled in turn.

    ``regret``: per labeled site, accuracy points the chooser lost to the best candidate measured there;
    ``rule_regret``: the same for each fixed rule "always this candidate" (candidate -> site -> points);
    ``atc_error``: per candidate, the mean |ATC estimate - measured accuracy| over those sites.
    """

    sites: list[str]
    regret: dict[str, float] = field(default_factory=dict)
    rule_regret: dict[str, dict[str, float]] = field(default_factory=dict)
    atc_error: dict[str, float] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return len(self.sites) >= 2

    def best_rule(self) -> tuple[str, float] | None:
        """The fixed rule with the lowest mean regret over the validated sites and that mean, if it beats the
        chooser's mean regret (ties keep the chooser); ``None`` otherwise or when nothing was validated.

        Why: on real shift the chooser can lose to a fixed rule by a wide margin (analyses/README.md §11d: 11.7
        points to "always prior:16" on the digit collections), so the report measures both on the user's own
        labeled sites and recommends the better policy.

        Example:
            >>> v = Validation(["a", "b"], {"a": 9.0, "b": 3.0}, {"ema": {"a": 9.0, "b": 3.0},
            ...                                                  "target": {"a": 0.0, "b": 1.0}})
            >>> v.best_rule()
            ('target', 0.5)
        """
        if not self.known or not self.rule_regret:
            return None
        means = {name: float(np.mean(list(r.values()))) for name, r in self.rule_regret.items()}
        name = min(means, key=lambda k: (means[k], list(means).index(k)))
        return (name, means[name]) if means[name] < float(np.mean(list(self.regret.values()))) else None


@dataclass
class LabelFree:
    """One unlabeled site's panel: tables (shift, indicators, drift), the chooser's pick and its evidence."""

    site: str
    shift: pd.DataFrame
    indicators: pd.DataFrame
    drift: pd.DataFrame | None
    chosen: str | None
    why: str


def validate_chooser(model: nn.Module, ds: SourceTaggedDataset, labeled: Sequence[str], candidates: Sequence[str], *,
                     calibration: float, seed: int = 0, run: Mapping[str, Any] | None = None) -> Validation:
    """Treat each labeled site as unlabeled in turn (the others labeled): the chooser's regret there and
    ATC's error per candidate. Needs two labeled sites (fewer: nothing is validated). ``run``: the
    report's ``batch_size``, ``stats_batch_size``, ``amp`` and ``forward``, passed to ``choose_strategy``."""
    labeled = list(labeled)
    val = Validation(labeled)
    if len(labeled) < 2:
        return val
    errors: dict[str, list[float]] = {}
    parts = _parts(ds, calibration, seed)
    for site in labeled:
        kept: dict = {}
        t = choose_strategy(model, ds, site, candidates, labeled=[s for s in labeled if s != site],
                            calibration=parts, seed=seed, keep_outputs=kept, **(run or {}))
        y = parts[1].subset(site).labels  # the true labels, masked for the chooser
        measured = {name: float(np.mean(kept[name, site].argmax(axis=1) == y)) for name in t["strategy"]}
        for name, value in measured.items():
            val.rule_regret.setdefault(name, {})[site] = 100 * (max(measured.values()) - value)
        val.regret[site] = val.rule_regret[t.loc[t["chosen"], "strategy"].iloc[0]][site]  # the chooser's pick's
        for row in t.itertuples():
            errors.setdefault(row.strategy, []).append(abs(row.pred_accuracy - measured[row.strategy]))
    val.atc_error = {k: float(np.mean(v)) for k, v in errors.items()}
    return val


def _parts(ds: SourceTaggedDataset, calibration: float, seed: int) -> tuple[SourceTaggedDataset, SourceTaggedDataset]:
    """The report's (calibration, evaluation) split, given explicitly so the chooser's masking cannot change it."""
    from shiftbn.evaluate.matrix import calibration_split

    return tuple(calibration_split(ds, calibration, False, seed))


def label_free_panel(model: nn.Module, ds: SourceTaggedDataset, site: str, *, outputs: dict, strategies: Sequence[str],
                     labeled: Sequence[str], candidates: Sequence[str], shift: pd.DataFrame, validation: Validation,
                     calibration: float, seed: int = 0, class_names: Sequence[str] | None = None,
                     word: str = "source", run: Mapping[str, Any] | None = None) -> LabelFree:
    """The panel for one unlabeled ``site``; ``outputs``: the report's kept ``(strategy, site) -> logits``.

    ``labeled``: the fully labeled sites (the chooser's ATC is fitted there); ``shift``: ``stats_shift``
    rows; ``run``: the report's ``batch_size``, ``stats_batch_size``, ``amp`` and ``forward``, used by
    the chooser and the drift monitor. The model is not changed.
    """
    run = run or {}
    profile = shift[(shift["source"] == site) & (shift["metric"] == "w2")][["layer", "depth", "value"]]
    profile = profile.rename(columns={"value": "w2_to_pooled"}).sort_values("depth").reset_index(drop=True)
    choice = None
    if labeled:
        choice = choose_strategy(model, ds, site, candidates, labeled=labeled,
                                 calibration=_parts(ds, calibration, seed), seed=seed, **run)
    rows = []
    base = outputs.get(("ema", site))
    for name in strategies:
        if (name, site) not in outputs:
            continue
        out = outputs[name, site]
        pred = out.argmax(axis=1)
        row = {"strategy": name, "n": len(out),
               "agreement_with_ema": float(np.mean(pred == base.argmax(axis=1))) if base is not None else np.nan,
               "mean_confidence": float(confidence_scores(out, "confidence").mean()),
               "mean_entropy": float(-confidence_scores(out, "neg_entropy").mean()),
               "predicted_classes": _histogram(pred, out.shape[1], class_names),
               "atc_estimate": _atc_cell(choice, name, validation, word)}
        rows.append(row)
    indicators = pd.DataFrame(rows)
    monitor_run = {k: run[k] for k in ("batch_size", "amp", "forward") if k in run}
    drift = _drift(model, ds, site, labeled, calibration, seed, monitor_run)
    chosen, why = _why(choice, validation, drift, site, word)
    return LabelFree(site, profile, indicators, drift, chosen, why)


def _histogram(pred: np.ndarray, k: int, class_names: Sequence[str] | None) -> str:
    counts = np.bincount(pred, minlength=k)
    names = list(class_names) if class_names is not None and len(class_names) == k else [str(c) for c in range(k)]
    return ", ".join(f"{n} {c / max(len(pred), 1):.0%}" for n, c in zip(names, counts, strict=True))


def _atc_cell(choice: pd.DataFrame | None, name: str, validation: Validation, word: str) -> str:
    """ATC's estimate with its measured error, or why it is not shown (never an estimate alone)."""
    if choice is None:
        return f"not shown: no labeled {word} to fit ATC on"
    row = choice[choice["strategy"] == name]
    if not len(row):
        return "not a candidate"
    r = row.iloc[0]
    err = validation.atc_error.get(name, np.nan)
    if not np.isfinite(err):
        return f"not shown: its error is unknown (measuring it needs two labeled {plural(word)})"
    if not bool(r["in_range"]):
        return "not shown: the statistics lie outside the range ATC was fitted on"
    return f"{r['pred_accuracy']:.2f} ± {err:.2f}"


def _drift(model: nn.Module, ds: SourceTaggedDataset, site: str, reference: Sequence[str], calibration: float,
           seed: int, run: Mapping[str, Any]) -> pd.DataFrame | None:
    """One row: the site's evaluation part scored by a monitor fitted on the reference sites' calibration part."""
    if not reference:
        return None
    cal, evaluation = _parts(ds, calibration, seed)
    ref = cal.subset(list(reference))
    part = evaluation.subset(site)
    if len(ref) < 2 or len(part) < 2:
        return None
    r = DriftMonitor(model, ref.without_labels(list(reference)), n_null=200, seed=seed, **run).score(part)
    layers = r.layers[r.layers["layer"] != "(all layers)"]
    top = layers.loc[layers["z"].idxmax()]
    return pd.DataFrame([{"reference": ", ".join(reference), "n": r.n, "score_z": r.score, "p_value": r.p_value,
                          "largest_layer": top["layer"], "largest_z": float(top["z"])}])


def _why(choice: pd.DataFrame | None, validation: Validation, drift: pd.DataFrame | None, site: str,
         word: str) -> tuple[str | None, str]:
    drift_text = ""
    if drift is not None:
        d = drift.iloc[0]
        drift_text = (f"; drift against the training {plural(word)}: score {d['score_z']:.1f} z, "
                      f"p = {d['p_value']:.3f} (largest at {d['largest_layer']})")
    if choice is None:
        return None, "no labeled " + word + " to fit the chooser on" + drift_text
    pick = choice[choice["chosen"]].iloc[0]
    rule = validation.best_rule()
    if rule is not None:
        regrets = list(validation.regret.values())
        worst = max(validation.rule_regret[rule[0]].values())
        evidence = (f"chosen without labels by the policy that did best on the {len(regrets)} labeled "
                    f"{plural(word)}, each treated as unlabeled: always {rule[0]} lost {rule[1]:.1f} points on "
                    f"average (at most {worst:.1f}) to the best strategy there, the label-free chooser "
                    f"{np.mean(regrets):.1f} (it would pick {pick['strategy']} here)")
        return rule[0], evidence + drift_text
    if validation.known:
        regrets = list(validation.regret.values())
        evidence = (f"chosen without labels (ATC and statistics distance); on the {len(regrets)} labeled "
                    f"{plural(word)}, each treated as unlabeled, the chooser lost {np.mean(regrets):.1f} points on "
                    f"average (at most {max(regrets):.1f}) to the best strategy there, no fixed rule less")
    else:
        evidence = (f"chosen without labels (ATC and statistics distance); its regret is unknown: validating it "
                    f"needs two labeled {plural(word)}")
    return str(pick["strategy"]), evidence + drift_text


ABSENT = {
    "shift": ("Needs no labels: distances between {site}'s BN statistics and the pooled ones, per layer. Absent: "
              "how much accuracy this shift costs, which needs {site}'s labels."),
    "indicators": ("Computed from the outputs alone. Absent: accuracy, ECE, per-class recall and the confusion "
                   "matrix at {site}, which need its labels; ATC's estimate is shown only beside the error it made "
                   "on labeled {words} left out one at a time."),
    "drift": ("Whether {site}'s BN-input statistics differ from the training {words}' beyond their own sampling "
              "variation (bootstrap null). Absent: the accuracy drop this drift causes, which needs {site}'s "
              "labels."),
}


def label_free_sections(panels: dict[str, LabelFree], word: str) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The report's tables and captions for each unlabeled site's panel; each caption names what is absent."""
    tables: dict[str, pd.DataFrame] = {}
    captions: dict[str, str] = {}
    words = plural(word)
    for site, p in panels.items():
        head = f"{site}, without labels"
        parts = ((f"{head}: BN statistics shift per layer", p.shift, "shift"),
                 (f"{head}: label-free indicators per strategy", p.indicators, "indicators"),
                 (f"{head}: drift test against the training {words}", p.drift, "drift"))
        for title, table, key in parts:
            if table is None or not len(table):
                tables[title] = pd.DataFrame({"note": [f"not computed: no labeled training {word} to compare with"]})
            else:
                tables[title] = table
            captions[title] = ABSENT[key].format(site=site, words=words)
        title = f"{head}: recommendation"
        tables[title] = pd.DataFrame([{"recommended": p.chosen or "none", "evidence": p.why}])
        captions[title] = (f"Chosen from {site}'s unlabeled data alone (choose_strategy). Absent: the paired interval "
                           f"of the recommended statistics against the model's own at {site}, which needs its labels.")
    return tables, captions
