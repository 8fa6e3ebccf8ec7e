"""The segmentation report's own figures: per-case distributions per source and strategy, and overlays of
prediction vs ground truth for a few cases per source under each main strategy.

Why: a segmentation cell is a mean over cases, and a mean of Dice hides the cases a strategy fails on;
the distributions show them, and an overlay shows what a failure looks like. Overlays run a separate
small pass over those few cases with each strategy's statistics (``use_stats``): the matrix keeps per-case
rows only, never dense outputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from torch import nn

from shiftbn._forward import Runner
from shiftbn._torch import forward_batches
from shiftbn.adapt import AdaptContext
from shiftbn.bn import use_stats
from shiftbn.evaluate.dense import case_values

OVERLAY_STRATEGIES = ("ema", "target", "precise")
"""The main strategies an overlay column is drawn for (those the report ran)."""

SKIPPED_SENTENCE = ("Calibration (ECE), confusion matrices and per-class recall read one class prediction per "
                    "sample, which a segmenter does not make, so they are not shown for segmentation; the per-case "
                    "distributions and overlays above take their place.")

NAMES = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "asd": "ASD", "accuracy": "Accuracy"}


def display(metric: str) -> str:
    """The name a heading uses for ``metric`` (``dice`` -> Dice, ``hd95`` -> HD95, ``dice:2`` -> Dice:2)."""
    base, sep, rest = metric.partition(":")
    return NAMES.get(base, base.capitalize()) + sep + rest


def case_table(outputs: Mapping[tuple[str, str], np.ndarray], metrics: Sequence[str],
               strategies: Sequence[str]) -> pd.DataFrame:
    """Tidy per-case values: ``strategy, eval_source, case, metric, value`` from the kept per-case rows."""
    frames = []
    for (strategy, source), rows in outputs.items():
        if strategy not in strategies:
            continue
        for m in metrics:
            v = case_values(m, rows)
            frames.append(pd.DataFrame({"strategy": strategy, "eval_source": source, "case": np.arange(len(v)),
                                        "metric": m, "value": v}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["strategy", "eval_source", "case", "metric", "value"])


def case_distributions(cases: pd.DataFrame, metrics: Sequence[str], word: str = "source") -> plt.Figure:
    """One panel per metric: a box per (source, strategy) over its cases, every case drawn as a dot."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        part = cases[cases["metric"] == m]
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated ``vert``
            warnings.simplefilter("ignore", DeprecationWarning)
            sns.boxplot(data=part, x="eval_source", y="value", hue="strategy", ax=ax, showfliers=False, fill=False)
        sns.stripplot(data=part, x="eval_source", y="value", hue="strategy", ax=ax, dodge=True, size=3,
                      palette="dark:black", alpha=0.6, legend=False)
        ax.set_xlabel(f"{word} evaluated")
        ax.set_ylabel(f"{display(m)} per case")
        ax.set_title(f"{display(m)}: one dot per case", fontsize=10)
    fig.tight_layout()
    return fig


def overlay_strategies(strategies: Sequence[str]) -> list[str]:
    """The main strategies (``OVERLAY_STRATEGIES``) among those the report ran, in that order."""
    return [s for s in OVERLAY_STRATEGIES if s in strategies]


def _stats_of(ctx: AdaptContext, strategy: str, source: str):
    """The statistics ``strategy`` normalizes ``source`` with; None for the model's own (ema)."""
    if strategy == "ema":
        return None
    if strategy == "target":
        return ctx.source_stats(source)
    return ctx.precise_stats()


def _mask(target) -> torch.Tensor:
    return target["mask"] if isinstance(target, Mapping) else torch.as_tensor(target)


def _middle(a: np.ndarray) -> np.ndarray:
    """The middle slice along the first axis of a 3-D array (a 2-D array as it is)."""
    return a[a.shape[0] // 2] if a.ndim == 3 else a


@torch.no_grad()
def overlay_cases(model: nn.Module, ctx: AdaptContext, eval_parts: Mapping[str, object], strategies: Sequence[str],
                  *, per_source: int = 2, forward=None, batch_size: int = 256) -> list[dict]:
    """Prediction and ground truth (middle slice for 3-D) of the first ``per_source`` cases of each source,
    under each strategy; one pass over those cases only, ``batch_size`` cases per forward (the report's
    ``--eval-batch-size``), the model restored by ``use_stats``."""
    runner = Runner(forward=forward)
    picks = {s: [part[i] for i in range(min(per_source, len(part)))] for s, part in eval_parts.items()}
    shown = []
    for source, items in picks.items():
        if not items:
            continue
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        preds = {}
        for strategy in strategies:
            stats = _stats_of(ctx, strategy, source)
            if stats is None:
                was = model.training
                model.eval()
                try:
                    out = forward_batches(model, x, batch_size, runner=runner)
                finally:
                    model.train(was)
            else:
                with use_stats(model, stats):
                    out = forward_batches(model, x, batch_size, runner=runner)
            preds[strategy] = out.argmax(1).cpu().numpy()
        for i, item in enumerate(items):
            image = torch.as_tensor(item[0]).float().numpy()
            image = image[0] if image.ndim in (3, 4) else image  # the first channel
            shown.append({"source": source, "case": i, "image": _middle(image),
                          "truth": _middle(_mask(item[1]).cpu().numpy()),
                          "pred": {s: _middle(p[i]) for s, p in preds.items()}})
    return shown


def overlay_figure(shown: Sequence[dict], strategies: Sequence[str], dice: Mapping[tuple[str, str], np.ndarray],
                   word: str = "source") -> plt.Figure:
    """Rows: (source, case); columns: strategies. The image, ground truth as solid and the prediction as
    dashed contours per foreground class, the case's Dice in the title."""
    rows, cols = len(shown), len(strategies)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False)
    for r, case in enumerate(shown):
        classes = sorted({int(c) for c in np.unique(case["truth"]) if c > 0}
                         | {int(c) for p in case["pred"].values() for c in np.unique(p) if c > 0})
        colors = sns.color_palette("bright", max(len(classes), 1))
        lo, hi = np.percentile(case["image"], [1, 99])
        for c, strategy in enumerate(strategies):
            ax = axes[r][c]
            ax.imshow(case["image"], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            for color, k in zip(colors, classes, strict=False):
                if (case["truth"] == k).any():
                    ax.contour(case["truth"] == k, levels=[0.5], colors=[color], linewidths=1.2, linestyles="solid")
                if (case["pred"][strategy] == k).any():
                    ax.contour(case["pred"][strategy] == k, levels=[0.5], colors=[color], linewidths=1.2,
                               linestyles="dashed")
            d = dice.get((strategy, case["source"]))
            score = "" if d is None else f", Dice {float(d[case['case']]):.2f}"
            ax.set_title(f"{case['source']} #{case['case']}: {strategy}{score}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"ground truth solid, prediction dashed (one colour per class); middle slice of 3-D cases; rows: "
                 f"{word} and case", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.0 * rows)))  # room for the suptitle
    return fig
