"""seaborn figures of shiftbn's tidy results; each function returns a matplotlib Figure.

No backend is chosen at import: figures are only written to files, and matplotlib falls back to
its file-only Agg backend where no display exists.
"""

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.patches import Rectangle

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import get_metric
from shiftbn.studies import EmaVsPrecise, FigureSpec, HeldOutSources


def matrix_heatmap(table: pd.DataFrame, metric: str = "accuracy", held_out: Sequence[str] = ()) -> plt.Figure:
    """Annotated heatmaps with a colour bar: strategy x eval source, and (when present) stats source x
    eval source. Cells show the interval below the value when the table has ``ci_low``/``ci_high``;
    ``held_out`` sources (never seen in training) are outlined and labelled."""
    t = table[table["metric"] == metric]
    cross_rows = t["is_cross_source"].astype(bool)
    main, cross = t[~cross_rows], t[cross_rows]
    panels = [(p, title) for p, title in ((main, "strategy"), (cross, "stats_source")) if len(p)]
    with_ci = {"ci_low", "ci_high"} <= set(t.columns) and t["ci_low"].notna().any()
    rows = max(len(main["strategy"].unique()), 4)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), (0.75 if with_ci else 0.5) * rows + 2.2),
                             squeeze=False)
    held = {str(h) for h in held_out}
    for ax, (part, title) in zip(axes[0], panels, strict=True):
        grid = part.pivot_table(index=title, columns="eval_source", values="value", sort=False)
        annot = grid.map(lambda v: f"{v:.2f}")
        if with_ci:
            lo = part.pivot_table(index=title, columns="eval_source", values="ci_low", sort=False)
            hi = part.pivot_table(index=title, columns="eval_source", values="ci_high", sort=False)
            annot = grid.map(lambda v: f"{v:.2f}") + "\n[" + lo.map(lambda v: f"{v:.2f}") + ", " + \
                hi.map(lambda v: f"{v:.2f}") + "]"
        bounded = get_metric(metric).bounded
        sns.heatmap(grid, annot=annot.to_numpy(), fmt="", cmap="viridis", ax=ax, cbar=True, vmin=0 if bounded else None,
                    vmax=1 if bounded else None, annot_kws={"fontsize": 7 if with_ci else 9},
                    cbar_kws={"label": metric, "shrink": 0.85})
        for c, col in enumerate(grid.columns):
            if str(col) in held:
                ax.add_patch(Rectangle((c, 0), 1, len(grid), fill=False, edgecolor="#e4572e", lw=2.5, clip_on=False))
        ax.set_xticklabels([f"{c}\n(held out)" if str(c) in held else str(c) for c in grid.columns], rotation=0)
        for label in ax.get_xticklabels():
            if label.get_text().endswith("(held out)"):
                label.set_color("#e4572e")
        what = "strategy" if title == "strategy" else "statistics of source i"
        ax.set_title(f"{metric}: {what} x eval source" + (" (cell: value, [95% CI])" if with_ci else ""), fontsize=10)
        ax.set_ylabel(title.replace("_", " "))
        ax.set_xlabel("eval source")
    fig.tight_layout()
    return fig


def shift_profile(shift: pd.DataFrame, word: str = "source") -> plt.Figure:
    """Distance of each source's BN statistics to the reference, by layer depth (one line per source);
    ``word``: what the data calls a source (the title and the legend say it)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    sns.lineplot(data=shift, x="depth", y="value", hue="source", marker="o", ax=ax)
    metric = shift["metric"].iloc[0] if len(shift) else ""
    layers = shift.drop_duplicates("depth").sort_values("depth")
    ax.set_xticks(layers["depth"], layers["layer"], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("BN layer (depth order)")
    ax.set_ylabel(f"{metric} distance to {shift['reference'].iloc[0] if len(shift) else ''}")
    ax.set_title(f"Layer shift profile: where each {word}'s shift shows")
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, title=word)
    fig.tight_layout()
    return fig


def ema_curves(curves: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Accuracy with EMA vs PreciseBN statistics over training steps, one panel per batch size."""
    return study_figure(EmaVsPrecise.figure, curves, metric)


def heldout_bars(table: pd.DataFrame, metric: str = "accuracy", word: str = "source") -> plt.Figure:
    """Accuracy on each held-out source, by strategy; ``word``: what the titles call a source."""
    return study_figure(HeldOutSources.figure, table, metric, word=word)


def lab_samples(ds: SourceTaggedDataset, per_lab: int = 6, seed: int = 0, word: str | None = None) -> plt.Figure:
    """A grid of sample images, one row per source, each source scaled to its own 1st-99th percentile range.

    Why: one common scale left sources with a low gain near-black; the per-source ranges are printed at
    each row, so intensity shifts between sources stay readable from the numbers. ``word``: what the
    title calls a source (default ``ds.source_word``).
    """
    word = ds.source_word if word is None else word
    rng = np.random.default_rng(seed)
    labs = ds.sources_present
    shown = {}
    for lab in labs:
        members = ds.indices_of(lab)
        idx = rng.choice(members, size=min(per_lab, len(members)), replace=False)
        shown[lab] = [torch.as_tensor(ds[int(i)][0]).float() for i in idx]
    fig, axes = plt.subplots(len(labs), per_lab, figsize=(per_lab * 1.1, len(labs) * 1.25), squeeze=False)
    for r, lab in enumerate(labs):
        values = torch.cat([x.flatten() for x in shown[lab]])[: 2**24]
        vmin, vmax = (float(v) for v in torch.quantile(values, torch.tensor([0.01, 0.99])))
        for c in range(per_lab):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(shown[lab]):
                x = ((shown[lab][c] - vmin) / max(vmax - vmin, 1e-8)).clamp(0, 1)
                img = x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0)
                ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(f"{lab}: {vmin:.2f} to {vmax:.2f}", fontsize=8, loc="left")
    fig.suptitle(f"Sample images per {word} (each {word} scaled to its own 1st-99th percentile)", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path) -> None:
    """Write a figure as PNG and close it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def study_figure(spec: FigureSpec, table: pd.DataFrame, metric: str | None = None, word: str = "source"
                 ) -> plt.Figure:
    """A study's figure as its ``FigureSpec`` declares it (error bars: sd over the rows averaged, i.e.
    over sources and seeds). ``metric``: default the table's first metric; ``word``: what the title and
    axis call a source (the data's ``source_word``)."""
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
    g.set_axis_labels((spec.xlabel or spec.x.replace("_", " ")).replace("{source}", word), metric)
    if g.legend is not None:
        sns.move_legend(g, "upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(6, len(g.legend.texts)),
                        frameon=False, title=None)
    g.figure.suptitle(spec.title.replace("{source}", word), y=1.04)
    return g.figure
