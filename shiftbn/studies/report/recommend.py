"""The report's first table: for each site, which statistics to deploy, why, at what cost, and the next command.

Why: a user reads a report to decide. With labels the decision rests on the paired interval of each
strategy against the model's own statistics (ema) at that site; without them on the policy
(``choose_strategy`` or a fixed rule) that lost least on the labeled sites, each treated as unlabeled,
and the drift test. The cost is the calibration (ECE) change and the class that loses most recall; a
site's significant losses are named even when the pooled view calls them noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from shiftbn.evaluate import get_metric, paired_difference, supports_difference
from shiftbn.studies.report.label_free import LabelFree
from shiftbn.studies.report.reading import plural

KEEP = "keep the model's own (ema)"


def labels_status(labels: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Per site: ``"all"``, ``"none"`` or ``"k of n"`` evaluation samples labeled (class label -1 = unlabeled)."""
    out = {}
    for site, y in labels.items():
        y = np.asarray(y)
        k = int((y >= 0).sum()) if y.ndim == 1 and y.dtype.kind in "iu" else len(y)
        out[site] = "all" if k == len(y) else "none" if k == 0 else f"{k} of {len(y)}"
    return out


def next_command(strategy: str | None, site: str, base: str, word: str) -> str:
    """The command that deploys ``strategy`` at ``site`` (``base``: ``shiftbn recalibrate`` with the
    model and data options)."""
    if strategy is None:
        return f"label some of {site}'s images, or add a labeled {word}, and rerun the report"
    if strategy == "ema":
        return "none: keep the checkpoint as it is"
    if strategy == "target":
        return f"{base} --target {site} --out model_{site}.pt"
    if strategy == "precise":
        return (f"{base} --method precise --out model_precise.pt (with --data holding the training "
                f"{plural(word)}' images only, as the report pooled them)")
    return f"no single checkpoint: {strategy} adapts at test time (shiftbn.adapt.parse_strategy({strategy!r}))"


def _shown(strategy: str | None, word: str) -> str:
    if strategy is None:
        return "no recommendation"
    if strategy == "ema":
        return KEEP
    if strategy == "target":
        return f"target (the {word}'s own statistics, AdaBN)"
    return strategy


def decision_table(sites: Sequence[str], status: Mapping[str, str], *, comparisons: pd.DataFrame | None,
                   outputs: Mapping[tuple[str, str], np.ndarray], labels: Mapping[str, np.ndarray],
                   label_free: Mapping[str, LabelFree], base: str, class_names: Sequence[str] | None = None,
                   level: float = 0.95, n_boot: int = 1000, seed: int = 0, word: str = "source",
                   metrics: Sequence[str] = ("accuracy",)) -> pd.DataFrame:
    """One row per site: ``<word>, labels, recommended, strategy, why, cost, next_command``.

    ``outputs``/``labels``: the labeled part of each site's kept outputs and labels; ``label_free``:
    the panels of sites without labels; ``comparisons``: ``paired_table`` rows of ``metrics[0]`` (None:
    no intervals). ``metrics``: the task's metrics; the first is the score (its direction:
    ``get_metric(m).higher_is_better``); for a task other than classification the cost is the paired
    change of the second metric (e.g. HD95 for Dice), since ECE and recall need class predictions.
    """
    rows = []
    for site in sites:
        if site in label_free:
            lf = label_free[site]
            strategy, why = lf.chosen, lf.why
            cost = "unknown without labels: the ECE change and per-class recall need them" + _mix(lf, strategy)
        else:
            strategy, why = _by_interval(comparisons, site, level, metrics[0])
            if get_metric(metrics[0]).task == "classification":
                cost = _cost(strategy, site, outputs, labels, class_names, level, n_boot, seed)
            else:
                cost = _dense_cost(strategy, site, outputs, labels, metrics, level, n_boot, seed)
            if status.get(site, "all") != "all":
                why += f" (scored on the {status[site]} labeled samples; statistics from all)"
        rows.append({word: site, "labels": status.get(site, "all"), "recommended": _shown(strategy, word),
                     "strategy": strategy or "", "why": why, "cost": cost,
                     "next_command": next_command(strategy, site, base, word)})
    return pd.DataFrame(rows)


def _points(d: float, lo: float, hi: float, bounded: bool = True) -> str:
    if not bounded:  # a distance (HD95, in the data's units): the difference itself, not points
        return f"{d:+.3g} [{lo:+.3g}, {hi:+.3g}]"
    return f"{100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _by_interval(comparisons: pd.DataFrame | None, site: str, level: float,
                 metric: str = "accuracy") -> tuple[str, str]:
    """The strategy with the largest gain over ema in ``metric`` (a rise, or a fall when lower is better)
    whose paired interval excludes 0 (else ema), and why."""
    if comparisons is None or not len(comparisons):
        return "ema", "no paired interval was computed (--no-ci), so no change is supported"
    c = comparisons[(comparisons["eval_source"] == site) & (comparisons["strategy"] != "ema")]
    if not len(c):
        return "ema", "no other strategy was evaluated here"
    m = get_metric(metric)
    sign = 1.0 if m.higher_is_better else -1.0  # gain = sign * diff
    sig = [supports_difference(lo, hi) for lo, hi in zip(c["ci_low"], c["ci_high"], strict=True)]
    gains = c[[s and sign * d > 0 for s, d in zip(sig, c["diff"], strict=True)]]
    losses = c[[s and sign * d < 0 for s, d in zip(sig, c["diff"], strict=True)]]
    n = int(c["n"].iloc[0])
    name = metric if metric == "accuracy" else _display(metric)
    unit = "" if metric == "accuracy" else " cases"

    def pts(d, lo, hi):
        return _points(d, lo, hi, m.bounded)

    if len(gains):
        best = gains.loc[(sign * gains["diff"]).idxmax()]
        strategy = str(best["strategy"])
        why = (f"{name} {pts(best['diff'], best['ci_low'], best['ci_high'])} over the model's own statistics "
               f"({level:.0%} paired interval, n={n}{unit})")
    else:
        best = c.loc[(sign * c["diff"]).idxmax()]
        strategy = "ema"
        named = "" if metric == "accuracy" else f"{name} "
        why = (f"no strategy beats the model's own statistics beyond noise (best: {best['strategy']} "
               f"{named}{pts(best['diff'], best['ci_low'], best['ci_high'])}, n={n}{unit})")
    if len(losses):
        why += "; worse beyond noise here: " + ", ".join(
            f"{r.strategy} {pts(r.diff, r.ci_low, r.ci_high)}"
            for r in losses.assign(gain=sign * losses["diff"]).sort_values("gain").itertuples())
    return strategy, why


def _display(metric: str) -> str:
    from shiftbn.studies.report.segmentation import display

    return display(metric)


def _dense_cost(strategy: str, site: str, outputs, labels, metrics: Sequence[str], level, n_boot, seed) -> str:
    """The paired change of the task's second metric (e.g. HD95 when the score is Dice) against ema."""
    if strategy == "ema":
        return "none: nothing changes"
    if len(metrics) < 2:
        return "ECE and per-class recall need class predictions; no second metric was scored"
    if (strategy, site) not in outputs or ("ema", site) not in outputs:
        return "not measured"
    from shiftbn.evaluate.metrics import metric_value

    second = metrics[1]
    a, b, y = outputs[strategy, site], outputs["ema", site], labels[site]
    d = paired_difference(a, b, y, second, n_boot=n_boot, level=level, seed=seed)
    return (f"{_display(second)} {metric_value(second, b, y):.3g} -> {metric_value(second, a, y):.3g} "
            f"({d.value:+.3g} [{d.low:+.3g}, {d.high:+.3g}], {level:.0%} paired interval); ECE and per-class "
            "recall need class predictions")


def _cost(strategy: str, site: str, outputs, labels, class_names, level, n_boot, seed) -> str:
    """ECE change (paired interval) and the class losing most recall, for ``strategy`` against ema."""
    if strategy == "ema":
        return "none: nothing changes"
    if (strategy, site) not in outputs or ("ema", site) not in outputs:
        return "not measured"
    a, b, y = outputs[strategy, site], outputs["ema", site], labels[site]
    d = paired_difference(a, b, y, "ece", n_boot=n_boot, level=level, seed=seed)
    from shiftbn.evaluate.metrics import metric_value

    ece = f"ECE {metric_value('ece', b, y):.2f} -> {metric_value('ece', a, y):.2f} ({d.value:+.2f} [{d.low:+.2f}, " \
          f"{d.high:+.2f}])"
    k = a.shape[1]
    names = list(class_names) if class_names is not None and len(class_names) == k else [str(c) for c in range(k)]
    changes = []
    for c in range(k):
        members = y == c
        if members.any():
            ra, rb = float(np.mean(a[members].argmax(1) == c)), float(np.mean(b[members].argmax(1) == c))
            changes.append((ra - rb, names[c], rb, ra, int(members.sum())))
    if not changes:
        return ece
    worst = min(changes)
    return (f"{ece}; worst class: {worst[1]} recall {worst[2]:.2f} -> {worst[3]:.2f} ({100 * worst[0]:+.1f} points, "
            f"n={worst[4]})")


def _mix(lf: LabelFree, strategy: str | None) -> str:
    """The predicted-class mix before and after, the one label-free sign of what the change does."""
    t = lf.indicators.set_index("strategy") if len(lf.indicators) else None
    if t is None or strategy in (None, "ema") or strategy not in t.index or "ema" not in t.index:
        return ""
    return f"; predicted classes {t.loc['ema', 'predicted_classes']} -> {t.loc[strategy, 'predicted_classes']}"


def decision_lines(table: pd.DataFrame, word: str) -> list[str]:
    """The decision table as terminal lines, one block per site."""
    lines = []
    for r in table.to_dict("records"):
        lines.append(f"{r[word]} (labels: {r['labels']}): {r['recommended']}")
        lines += [f"  why: {r['why']}", f"  cost: {r['cost']}", f"  next: {r['next_command']}"]
    return lines


def decision_caption(word: str, level: float, metrics: Sequence[str] = ("accuracy",)) -> str:
    """What the decision table's columns mean."""
    if metrics[0] != "accuracy" and get_metric(metrics[0]).task != "classification":
        second = f"the {_display(metrics[1])} change with its paired interval" if len(metrics) > 1 else "nothing"
        return (f"For each {word}: the statistics to deploy and why ({level:.0%} paired interval over cases of "
                f"{_display(metrics[0])} against the model's own statistics), what the change costs ({second}) and "
                "the command that deploys it.")
    return (f"For each {word}: the statistics to deploy and why ({level:.0%} paired interval of accuracy against the "
            f"model's own statistics when the {word} has labels; without labels, the label-free chooser with the "
            f"regret it had on the labeled {plural(word)} and the drift test), what the change costs (ECE change "
            "with its paired interval, and the class losing most recall) and the command that deploys it.")
