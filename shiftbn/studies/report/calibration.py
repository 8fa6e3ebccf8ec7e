"""Per-site calibration (reliability diagrams, ECE before/after recalibration) and per-class breakdowns.

Why: a recalibrated model can be more accurate and still over-confident on a new site; and an
average accuracy hides a class that collapses at one site. Inputs are the outputs kept by
``score(keep_outputs=...)``: ``(strategy, site) -> (N, K)`` logits in the order of ``labels[site]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from shiftbn.evaluate import bootstrap_interval, paired_difference

Outputs = dict[tuple[str, str], np.ndarray]


def _probs(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def reliability_points(logits: np.ndarray, y: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and count (bins of width 1/bins, empty ones dropped)."""
    p = _probs(logits)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    b = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    frame = pd.DataFrame({"bin": b, "confidence": conf, "accuracy": correct})
    out = frame.groupby("bin").agg(confidence=("confidence", "mean"), accuracy=("accuracy", "mean"),
                                   n=("accuracy", "size")).reset_index()
    return out


def reliability_diagrams(outputs: Outputs, labels: dict[str, np.ndarray], sites: Sequence[str], *,
                         before: str = "ema", after: str = "target", bins: int = 10,
                         word: str = "source") -> plt.Figure:
    """One reliability diagram per site: accuracy vs confidence with ``before`` and ``after`` statistics,
    over bars of each one's sample count per confidence bin (a point of 2 samples weighs little);
    ``word``: what the title calls a site."""
    sites = list(sites)
    cols = min(4, len(sites))
    rows = -(-len(sites) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.1 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(sites):]:
        ax.axis("off")
    for ax, site in zip(axes.flat, sites, strict=False):
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
        counts = ax.twinx()  # behind the curves: the bin counts
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        for i, (strat, colour) in enumerate(((before, "#e4572e"), (after, "#1f77b4"))):
            if (strat, site) not in outputs:
                continue
            pts = reliability_points(outputs[(strat, site)], labels[site], bins)
            ax.plot(pts["confidence"], pts["accuracy"], marker="o", ms=3, color=colour, label=strat)
            counts.bar((pts["bin"] + 0.25 + 0.5 * i) / bins, pts["n"], width=0.5 / bins, color=colour, alpha=0.25)
        counts.set_ylabel("samples per bin", fontsize=7)
        counts.tick_params(labelsize=6)
        ax.set_title(f"{site} (n={len(labels[site])})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    fig.suptitle(f"Reliability per {word}: {before} vs {after} statistics (diagonal = calibrated; bars: samples "
                 "per confidence bin)", fontsize=10)
    fig.tight_layout()
    return fig


def calibration_table(outputs: Outputs, labels: dict[str, np.ndarray], sites: Sequence[str], *,
                      before: str = "ema", after: str = "target", n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> pd.DataFrame:
    """ECE per site with ``before`` and ``after`` statistics, their intervals and the paired change.

    Rows: ``site, n, ece_before, before_low, before_high, ece_after, after_low, after_high, change,
    change_low, change_high`` (change = after - before; an interval containing 0 is no change).
    """
    rows = []
    for site in sites:
        if (before, site) not in outputs or (after, site) not in outputs:
            continue
        y, a, b = labels[site], outputs[(after, site)], outputs[(before, site)]
        ib = bootstrap_interval(b, y, "ece", n_boot=n_boot, level=level, seed=seed)
        ia = bootstrap_interval(a, y, "ece", n_boot=n_boot, level=level, seed=seed)
        d = paired_difference(a, b, y, "ece", n_boot=n_boot, level=level, seed=seed)
        rows.append({"site": site, "n": len(y), "ece_before": ib.value, "before_low": ib.low,
                     "before_high": ib.high, "ece_after": ia.value, "after_low": ia.low, "after_high": ia.high,
                     "change": d.value, "change_low": d.low, "change_high": d.high})
    return pd.DataFrame(rows)


def per_class_table(outputs: Outputs, labels: dict[str, np.ndarray], sites: Sequence[str], strategies: Sequence[str],
                    class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Recall of each class at each site under each strategy, with the class's count ``n`` there.

    Rows: ``site, class, strategy, recall, n`` (from sklearn's ``confusion_matrix``).
    """
    from sklearn.metrics import confusion_matrix

    rows = []
    for site in sites:
        y = labels[site]
        for st in strategies:
            if (st, site) not in outputs:
                continue
            out = outputs[(st, site)]
            k = out.shape[1]
            cm = confusion_matrix(y, out.argmax(1), labels=np.arange(k))
            for c in range(k):
                n = int(cm[c].sum())
                if n:
                    rows.append({"site": site, "class": _name(class_names, c), "strategy": st,
                                 "recall": cm[c, c] / n, "n": n})
    return pd.DataFrame(rows)


def confusion_figure(outputs: Outputs, labels: dict[str, np.ndarray], sites: Sequence[str], strategy: str, *,
                     class_names: Sequence[str] | None = None, word: str = "source") -> plt.Figure:
    """Row-normalized confusion matrices, one per site, under ``strategy`` (sklearn ``confusion_matrix``
    drawn by its ``ConfusionMatrixDisplay``; ``word``: what the title calls a site).

    Why sklearn's display and not seaborn's heatmap: the heatmap draws the whole figure once per panel
    (to test its tick labels for overlap), which made this figure quadratic in the number of sites.
    """
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    sites = [s for s in sites if (strategy, s) in outputs]
    cols = min(3, len(sites))
    rows = -(-len(sites) // cols)
    k = outputs[(strategy, sites[0])].shape[1]
    size = 2.0 + 0.28 * k
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1, size * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(sites):]:
        ax.axis("off")
    names = [_name(class_names, c) for c in range(k)]
    rotate = k > 6 or max(map(len, names)) > 3
    for ax, site in zip(axes.flat, sites, strict=False):
        cm = confusion_matrix(labels[site], outputs[(strategy, site)].argmax(1), labels=np.arange(k))
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        # only the cells something fell into are labeled (not a hundred "0.00"), and only while they are legible
        shown = ConfusionMatrixDisplay(norm, display_labels=names).plot(
            ax=ax, cmap="Blues", include_values=k <= 10, values_format=".2f", colorbar=True,
            xticks_rotation="vertical" if rotate else "horizontal", im_kw={"vmin": 0, "vmax": 1},
            text_kw={"fontsize": 6})
        if shown.text_ is not None:
            for (i, j), text in np.ndenumerate(shown.text_):
                text.set_text(text.get_text() if cm[i, j] > 0 else "")
        shown.im_.colorbar.ax.tick_params(labelsize=7)
        ax.set_title(f"{site} (n={len(labels[site])})", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Confusion per {word} under {strategy} (rows: true class, normalized)", fontsize=10)
    fig.tight_layout()
    return fig


def _name(class_names: Sequence[str] | None, c: int) -> str:
    return str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)
