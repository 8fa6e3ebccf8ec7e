"""The report's plain-language reading, generated from the numbers and their intervals.

Why: a sentence such as "target beats ema on lab_e" is only written when the paired interval of
the difference excludes 0; otherwise the reading says the difference is within noise. A model whose
accuracy is within noise of chance gets no strategy ranking at all. Sources are called by the data's
own word (``SourceTaggedDataset.source_word``: "lab", "hospital", ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from shiftbn.evaluate import supports_difference
from shiftbn.evaluate.dense import parse_dense_name
from shiftbn.evaluate.metrics import get_metric

_Z = {0.8: 1.2816, 0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}


def plural(word: str) -> str:
    """English plural of a source word: lab -> labs, center -> centers, batch -> batches, study -> studies."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _kind(metric: str) -> str:
    """How ``metric`` reads: ``"pct"`` (a proportion: 61.0%, differences in points), ``"score"`` (Dice, IoU: a
    0-1 score) or ``"mm"`` (HD95, ASD: a distance in the data's spacing unit, mm for NIfTI; lower is better)."""
    parsed = parse_dense_name(metric)
    if parsed is None:
        return "pct"
    return "score" if parsed[0] in ("dice", "iou") else "mm"


def _label(metric: str) -> str:
    """``dice`` -> Dice, ``hd95:2`` -> HD95:2 (the report's headings' spelling)."""
    from shiftbn.studies.report.segmentation import display

    return display(metric)


def _value(v: float, metric: str) -> str:
    kind = _kind(metric)
    return _pct(v) if kind == "pct" else f"{v:.3f}" if kind == "score" else f"{v:.2f} mm"


def _higher_is_better(metric: str) -> bool:
    try:
        return bool(get_metric(metric).higher_is_better)
    except ValueError:  # a metric the table does not know: the accuracy reading
        return True


def _ci(low: float, high: float, level: float, pct: bool = True, metric: str = "accuracy") -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return ""
    kind = _kind(metric)
    if kind == "mm":
        return f"{level:.0%} CI {low:.2f} to {high:.2f} mm"
    fmt = _pct if pct and kind == "pct" else (lambda v: f"{v:.3f}")
    return f"{level:.0%} CI {fmt(low)} to {fmt(high)}"


def _cell_note(row: pd.Series, level: float, metric: str = "accuracy") -> str:
    """``(95% CI a to b, n=N)`` for a matrix row (just ``(n=N)`` without an interval); Dice/IoU rows say the
    score's range first, HD95/ASD rows that lower is better."""
    parts = []
    kind = _kind(metric)
    if kind != "pct":
        parts.append("0 to 1, higher is better" if kind == "score" else "lower is better")
    if "ci_low" in row and pd.notna(row.get("ci_low")):
        parts.append(_ci(row["ci_low"], row["ci_high"], level, metric=metric))
    if "n" in row and pd.notna(row.get("n")):
        parts.append(f"n={int(row['n'])}")
    if kind != "pct" and len(parts) > 1:
        return f" ({parts[0]}; {', '.join(p for p in parts[1:] if p)})"
    return f" ({', '.join(p for p in parts if p)})" if parts else ""


def _diff_text(diff: float, low: float, high: float, level: float, metric: str = "accuracy") -> str:
    kind = _kind(metric)
    if kind == "pct":
        points, lo, hi, unit = f"{100 * diff:+.1f} points", f"{100 * low:+.1f}", f"{100 * high:+.1f}", ""
    elif kind == "score":
        points, lo, hi, unit = f"{diff:+.3f} {_label(metric)}", f"{low:+.3f}", f"{high:+.3f}", ""
    else:
        points, lo, hi, unit = f"{diff:+.2f} mm", f"{low:+.2f}", f"{high:+.2f}", " mm"
    if supports_difference(low, high):
        return f"{points}, {level:.0%} paired interval {lo} to {hi}{unit}"
    return f"{points}, within noise ({level:.0%} interval of the difference, {lo} to {hi}{unit}, includes 0)"


def _normal_diff(a: float, b: float, na: int, nb: int, level: float) -> tuple[float, float]:
    """An approximate unpaired interval of a - b for two proportions (used where outputs were not kept)."""
    z = _Z.get(round(level, 2), 1.96)
    se = np.sqrt(a * (1 - a) / max(na, 1) + b * (1 - b) / max(nb, 1))
    return a - b - z * se, a - b + z * se


def _chance(pooled: pd.DataFrame | None, src_rows: pd.DataFrame, num_classes: int | None,
            level: float, word: str) -> tuple[bool, str]:
    """Whether the ema accuracy pooled over sources is within noise of 1/K, and the sentence saying so."""
    if not num_classes:
        return False, ""
    chance = 1.0 / num_classes
    if pooled is not None and len(pooled) and "ema" in set(pooled["strategy"]):
        r = pooled.set_index("strategy").loc["ema"]
        value, low, high, n = r["value"], r["ci_low"], r["ci_high"], int(r["n"])
    else:
        n = int(src_rows["n"].sum())
        value = float((src_rows["value"] * src_rows["n"]).sum() / max(n, 1))
        z = _Z.get(round(level, 2), 1.96)
        half = z * np.sqrt(value * (1 - value) / max(n, 1))
        low, high = value - half, value + half
    if low > chance:
        return False, ""
    return True, (f"The model's accuracy with its own statistics, pooled over {plural(word)}, is {_pct(value)} "
                  f"({_ci(low, high, level)}, n={n}): within noise of chance level (1/{num_classes} = "
                  f"{_pct(chance)}). Strategy differences of a model at chance are noise, so no strategy is "
                  "ranked here; train longer (the --quick demo trains for seconds) or check the labels.")


def findings(matrix: pd.DataFrame, heldout: pd.DataFrame | None = None, shift: pd.DataFrame | None = None,
             metric: str = "accuracy", *, comparisons: pd.DataFrame | None = None,
             pooled: pd.DataFrame | None = None, num_classes: int | None = None, held_out: Sequence[str] = (),
             level: float = 0.95, word: str = "source", ece: pd.DataFrame | None = None,
             decisions: pd.DataFrame | None = None, unlabeled: Sequence[str] = ()) -> list[str]:
    """Paragraphs of plain language from the numbers: worst source, what helps there, held-out sources, and
    where in the network the shift shows; every claimed difference has a supporting interval.

    ``matrix``: ``cross_source_matrix`` rows (``ci_low``/``ci_high`` used when present);
    ``heldout``: rows of ``HeldOutSources`` (models retrained without each source), or None;
    ``shift``: one metric of ``stats_shift``; ``comparisons``: ``paired_table`` rows (strategy minus
    ema per source); ``pooled``: ``pooled_table`` rows; ``num_classes``: K, for the chance check;
    ``held_out``: sources the model never saw in training (their matrix rows are the held-out view);
    ``word``: what the data calls a source (``ds.source_word``), used in every sentence; ``ece``: paired
    ECE changes per source and strategy (``build.ece_changes``); ``decisions``: the decision per source
    (``recommend.decision_table``), summarized last; ``unlabeled``: sources without labels (no metric).
    No sentence is written twice.
    """
    return _once(_paragraphs(matrix, heldout, shift, metric, comparisons, pooled, num_classes, held_out, level, word,
                             ece, decisions, unlabeled))


def _once(paragraphs: list[str]) -> list[str]:
    """The paragraphs with every sentence after its first occurrence dropped (empty paragraphs too)."""
    seen: set[str] = set()
    out = []
    for para in paragraphs:
        kept = []
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para.strip()):
            if sentence and sentence not in seen:
                seen.add(sentence)
                kept.append(sentence)
        if kept:
            out.append(" ".join(kept))
    return out


def _paragraphs(matrix, heldout, shift, metric, comparisons, pooled, num_classes, held_out, level, word, ece,
                decisions, unlabeled) -> list[str]:
    closing = _decision_text(decisions, word) + _unlabeled_text(unlabeled, word)
    m = matrix[matrix["metric"] == metric]
    main = m[~m["is_cross_source"].astype(bool)]
    src_rows = main[main["strategy"] == "ema"].set_index("eval_source")
    src = src_rows["value"]
    if not len(src):  # no labeled source: nothing to score
        return [closing.strip()]
    worst = src.idxmin() if _higher_is_better(metric) else src.idxmax()
    at = (f"{_pct(src[worst])} {metric}" if _kind(metric) == "pct" else
          f"{_label(metric)} {_value(src[worst], metric)}")
    first = (f"With the statistics stored in the model (its training EMA), the worst {word} is {worst} at "
             f"{at}{_cell_note(src_rows.loc[worst], level, metric)}, against "
             f"{_value(src.drop(worst).mean(), metric) if len(src) > 1 else 'n/a'} on average elsewhere.")
    at_chance, chance_text = _chance(pooled, src_rows.reset_index(), num_classes if metric == "accuracy" else None,
                                     level, word)
    if at_chance:
        return [first, chance_text, closing.strip()]
    if num_classes and metric == "accuracy" and "ci_low" in src_rows:
        noisy = [s for s in src.index if src_rows.loc[s, "ci_low"] <= 1.0 / num_classes]
        if noisy:
            first += (f" On {', '.join(noisy)} the model's accuracy with its own statistics is within noise of "
                      f"chance (1/{num_classes}).")
    first += " " + _worst_site_text(main, comparisons, worst, metric, level)
    first += _pooled_text(pooled, level, word, metric)
    parts = [first + _losses_text(comparisons, level, word, metric) + _ece_text(ece, level)]
    held = " ".join(t for t in (_held_out_text(main, comparisons, held_out, metric, level),
                                _retrained_text(heldout, metric, level, word)) if t)
    if held:
        parts.append(held + _shift_text(shift, worst))
    elif shift is not None and len(shift):
        parts.append(_shift_text(shift, worst).strip())
    return [*parts, closing.strip()]


def _losses_text(comparisons: pd.DataFrame | None, level: float, word: str, metric: str = "accuracy") -> str:
    """Every per-source loss whose paired interval excludes 0: a pooled "within noise" must not hide one."""
    if comparisons is None or not len(comparisons):
        return ""
    up = _higher_is_better(metric)
    worse = comparisons["ci_high"] < 0 if up else comparisons["ci_low"] > 0
    c = comparisons[worse & (comparisons["strategy"] != "ema")]
    if not len(c):
        return ""
    listed = "; ".join(f"{r.strategy} on {r.eval_source} ({_diff_text(r.diff, r.ci_low, r.ci_high, level, metric)})"
                       for r in c.sort_values("diff", ascending=up).itertuples())
    return f" Per {word}, worse than the stored statistics beyond noise: {listed}."


def _ece_text(ece: pd.DataFrame | None, level: float) -> str:
    """Every ECE increase a strategy causes at a source (paired interval above 0)."""
    if ece is None or not len(ece):
        return ""
    up = ece[ece["ci_low"] > 0]
    if not len(up):
        return ""
    listed = "; ".join(f"{r.strategy} raises {r.eval_source}'s ECE from {r.before:.2f} to {r.after:.2f} "
                       f"({r.diff:+.2f}, {level:.0%} paired interval {r.ci_low:+.2f} to {r.ci_high:+.2f})"
                       for r in up.sort_values("diff", ascending=False).itertuples())
    return f" Calibration gets worse: {listed}."


def _decision_text(decisions: pd.DataFrame | None, word: str) -> str:
    if decisions is None or not len(decisions):
        return ""
    said = [f"{r[word]}: {r['recommended']}" for r in decisions.to_dict("records")]
    return f" Recommendation per {word} (why, cost and the next command: the table at the top): {'; '.join(said)}."


def _unlabeled_text(unlabeled: Sequence[str], word: str) -> str:
    if not unlabeled:
        return ""
    return (f" {', '.join(unlabeled)} {'has' if len(unlabeled) == 1 else 'have'} no labels: no accuracy, ECE or "
            f"recall is reported for {'it' if len(unlabeled) == 1 else 'them'}; the label-free panel shows what the "
            f"unlabeled {word} data alone supports.")


def _worst_site_text(main: pd.DataFrame, comparisons: pd.DataFrame | None, worst: str, metric: str,
                     level: float) -> str:
    up = _higher_is_better(metric)
    if comparisons is None or not len(comparisons):
        on = main[main["eval_source"] == worst]
        best = on.loc[on["value"].idxmax() if up else on["value"].idxmin()]
        name = metric if _kind(metric) == "pct" else _label(metric)
        return (f"On {worst}, the {'highest' if up else 'lowest'} {name} is {best['strategy']}'s "
                f"({_value(best['value'], metric)}); no paired interval was computed, so no difference is claimed.")
    c = comparisons[comparisons["eval_source"] == worst]
    if not len(c):
        return ""
    best = c.loc[c["diff"].idxmax() if up else c["diff"].idxmin()]
    diff = _diff_text(best["diff"], best["ci_low"], best["ci_high"], level, metric)
    if supports_difference(best["ci_low"], best["ci_high"]) and (best["diff"] > 0 if up else best["diff"] < 0):
        return (f"On {worst}, the largest gain over the stored statistics (ema) is {best['strategy']}'s "
                f"({diff}).")
    return (f"On {worst}, no strategy beats the stored statistics (ema) beyond noise: the best, {best['strategy']}, is "
            f"{diff}.")


def _pooled_text(pooled: pd.DataFrame | None, level: float, word: str, metric: str = "accuracy") -> str:
    if pooled is None or not len(pooled) or "diff" not in pooled:
        return ""
    others = pooled[pooled["strategy"] != "ema"]
    sign = 1 if _higher_is_better(metric) else -1  # a gain in HD95 is a decrease
    better = others[[supports_difference(lo, hi) and sign * d > 0 for d, lo, hi in
                     zip(others["diff"], others["diff_low"], others["diff_high"], strict=True)]]
    worse = others[[supports_difference(lo, hi) and sign * d < 0 for d, lo, hi in
                    zip(others["diff"], others["diff_low"], others["diff_high"], strict=True)]]
    noise = others[~others["strategy"].isin(set(better["strategy"]) | set(worse["strategy"]))]
    kind = _kind(metric)

    def one(r) -> str:
        if kind == "pct":
            return f"{r.strategy} ({100 * r.diff:+.1f} points, {100 * r.diff_low:+.1f} to {100 * r.diff_high:+.1f})"
        if kind == "score":
            return f"{r.strategy} ({r.diff:+.3f} {_label(metric)}, {r.diff_low:+.3f} to {r.diff_high:+.3f})"
        return f"{r.strategy} ({r.diff:+.2f} mm, {r.diff_low:+.2f} to {r.diff_high:+.2f} mm)"

    def listed(rows: pd.DataFrame) -> str:
        return ", ".join(one(r) for r in rows.sort_values("diff", ascending=sign < 0).itertuples())

    n = int(pooled["n"].iloc[0])
    text = (f" Pooled over {plural(word)} (n={n}, resampled within each {word}, {level:.0%} paired intervals against "
            "ema): ")
    parts = []
    if len(better):
        parts.append(f"better than the stored statistics beyond noise: {listed(better)}")
    if len(worse):
        parts.append(f"worse beyond noise: {listed(worse)}")
    if len(noise):
        parts.append(f"within noise of it (interval of the difference includes 0): {listed(noise)}")
    return text + "; ".join(parts) + ". Differences among the other strategies themselves are not tested here."


def _held_out_text(main: pd.DataFrame, comparisons: pd.DataFrame | None, held_out: Sequence[str], metric: str,
                   level: float) -> str:
    texts = []
    for h in held_out:
        rows = main[main["eval_source"] == h].set_index("strategy")
        if "ema" not in rows.index:
            continue
        value = _value(rows.loc["ema", "value"], metric)
        text = f"{h} was never seen in training: with the model's own statistics it scores {value}"
        c = None if comparisons is None else comparisons[(comparisons["eval_source"] == h)
                                                           & (comparisons["strategy"] == "target")]
        if c is not None and len(c) and "target" in rows.index:
            r = c.iloc[0]
            text += (f", with its own statistics (target/AdaBN) {_value(rows.loc['target', 'value'], metric)} "
                     f"({_diff_text(r['diff'], r['ci_low'], r['ci_high'], level, metric)})")
        texts.append(text + ".")
    return " ".join(texts)


def _retrained_text(heldout: pd.DataFrame | None, metric: str, level: float, word: str) -> str:
    if heldout is None or not len(heldout):
        return ""
    h = heldout[heldout["is_held_out"].astype(bool) & (heldout["metric"] == metric)]
    by = h.groupby(["held_out", "strategy"])[["value", "n"]].mean().unstack()
    text = f"When a {word} is held out of training and seen only at test (a model retrained without it), "
    if ("value", "ema") in by and ("value", "target") in by:
        gain = by[("value", "target")] - by[("value", "ema")]
        top = gain.idxmax()
        s, t = by.loc[top, ("value", "ema")], by.loc[top, ("value", "target")]
        n = int(by.loc[top, ("n", "target")])
        low, high = _normal_diff(t, s, n, n, level)
        verdict = _diff_text(t - s, low, high, level).replace("paired interval", "approximate unpaired interval")
        text += (f"recomputing BN statistics on its unlabeled data (target/AdaBN) takes {top} from {_pct(s)} to "
                 f"{_pct(t)} (n={n}; {verdict})")
        if len(gain) > 1:
            text += f"; {100 * gain.mean():+.1f} points on average over {len(gain)} held-out {plural(word)}"
        text += ". "
    return text


def _shift_text(shift: pd.DataFrame | None, worst: str) -> str:
    if shift is None or not len(shift):
        return ""
    s = shift[shift["source"] == worst]
    if not len(s):
        return ""
    top = s.loc[s["value"].idxmax()]
    return (f" The shift profile places {worst}'s largest statistics shift at layer {top['layer']} "
            f"(depth {int(top['depth'])}).")
