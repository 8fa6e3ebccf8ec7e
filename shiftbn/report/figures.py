"""seaborn figures of shiftbn's tidy results; each function returns a matplotlib Figure.

No backend is chosen at import: figures are only written to files, and matplotlib falls back to
its file-only Agg backend where no display exists.
"""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import get_metric
from shiftbn.protocols import EmaVsPrecise, FigureSpec, HeldOutSources


def matrix_heatmap(table: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Annotated heatmaps: strategy x eval source, and (when present) stats source x eval source."""
    t = table[table["metric"] == metric]
    cross_rows = t["is_cross_source"].astype(bool)
    main, cross = t[~cross_rows], t[cross_rows]
    panels = [p for p in (main, cross) if len(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.5 * max(len(main["strategy"].unique()),
                                                                                      4) + 2), squeeze=False)
    for ax, (part, title) in zip(axes[0], ((main, "strategy"), (cross, "stats_source")), strict=False):
        if not len(part):
            continue
        grid = part.pivot_table(index=title, columns="eval_source", values="value", sort=False)
        sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", ax=ax, cbar=False, vmin=0, vmax=1 if
                    get_metric(metric).bounded else None)
        ax.set_title(f"{metric}: {'strategy' if title == 'strategy' else 'statistics of source i'} x eval source")
        ax.set_ylabel(title.replace("_", " "))
        ax.set_xlabel("eval source")
    fig.tight_layout()
    return fig


def shift_profile(shift: pd.DataFrame) -> plt.Figure:
    """Distance of each source's BN statistics to the reference, by layer depth (one line per source)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    sns.lineplot(data=shift, x="depth", y="value", hue="source", marker="o", ax=ax)
    metric = shift["metric"].iloc[0] if len(shift) else ""
    layers = shift.drop_duplicates("depth").sort_values("depth")
    ax.set_xticks(layers["depth"], layers["layer"], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("BN layer (depth order)")
    ax.set_ylabel(f"{metric} distance to {shift['reference'].iloc[0] if len(shift) else ''}")
    ax.set_title("Layer shift profile: where each lab's shift shows")
    fig.tight_layout()
    return fig


def ema_curves(curves: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Accuracy with EMA vs PreciseBN statistics over training steps, one panel per batch size."""
    return study_figure(EmaVsPrecise.figure, curves, metric)


def heldout_bars(table: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Accuracy on each held-out lab, by strategy."""
    return study_figure(HeldOutSources.figure, table, metric)


def lab_samples(ds: SourceTaggedDataset, per_lab: int = 6, seed: int = 0) -> plt.Figure:
    """A grid of sample images, one row per lab, all on one intensity scale so shifts are visible."""
    rng = np.random.default_rng(seed)
    labs = ds.sources_present
    shown = {}
    for lab in labs:
        members = ds.indices_of(lab)
        idx = rng.choice(members, size=min(per_lab, len(members)), replace=False)
        shown[lab] = [torch.as_tensor(ds[int(i)][0]) for i in idx]
    everything = torch.cat([x.flatten() for xs in shown.values() for x in xs])
    vmin, vmax = float(everything.min()), float(everything.quantile(0.99)) if everything.numel() < 2**24 else 1.0
    fig, axes = plt.subplots(len(labs), per_lab, figsize=(per_lab * 1.1, len(labs) * 1.15), squeeze=False)
    for r, lab in enumerate(labs):
        for c in range(per_lab):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(shown[lab]):
                x = shown[lab][c]
                img = x[0] if x.shape[0] == 1 else ((x - vmin) / max(vmax - vmin, 1e-8)).permute(1, 2, 0).clamp(0, 1)
                ax.imshow(img.numpy(), cmap="gray", vmin=vmin, vmax=vmax)
        axes[r, 0].set_title(lab, fontsize=8, loc="left")
    fig.suptitle(f"Sample images per lab (common grey scale {vmin:.2f} to {vmax:.2f})", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path) -> None:
    """Write a figure as PNG and close it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def study_figure(spec: FigureSpec, table: pd.DataFrame, metric: str | None = None) -> plt.Figure:
    """A study's figure as its ``FigureSpec`` declares it (error bars: sd over the rows averaged, i.e.
    over sources and seeds). ``metric``: default the table's first metric."""
    data = table
    for col, value in spec.where:
        data = data[data[col].astype(type(value)) == value]
    metric = metric or str(data["metric"].iloc[0])
    data = data[data["metric"] == metric]
    if spec.kind == "bars":
        g = sns.catplot(data=data, x=spec.x, y="value", hue=spec.hue, col=spec.col, kind="bar", errorbar="sd",
                        height=3.4, aspect=1.3)
    else:
        g = sns.relplot(data=data, x=spec.x, y="value", hue=spec.hue, col=spec.col, kind="line", marker="o",
                        errorbar="sd", height=3.4, aspect=1.3)
        if spec.log2_x:
            g.set(xscale="log")
            for ax in g.axes.flat:
                ax.set_xscale("log", base=2)
    g.set_axis_labels(spec.xlabel or spec.x.replace("_", " "), metric)
    g.figure.suptitle(spec.title, y=1.04)
    return g.figure
