"""seaborn figures of shiftbn's tidy results; each function returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from shiftbn.data.tagged import SourceTaggedDataset  # noqa: E402


def matrix_heatmap(table: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Annotated heatmaps: strategy x eval source, and (when present) stats source x eval source."""
    t = table[table["metric"] == metric]
    main = t[~t["strategy"].str.startswith("stats:")]
    cross = t[t["strategy"].str.startswith("stats:")]
    panels = [p for p in (main, cross) if len(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.5 * max(len(main["strategy"].unique()),
                                                                                      4) + 2), squeeze=False)
    for ax, (part, title) in zip(axes[0], ((main, "strategy"), (cross, "stats_source")), strict=False):
        if not len(part):
            continue
        grid = part.pivot_table(index=title, columns="eval_source", values="value", sort=False)
        sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", ax=ax, cbar=False, vmin=0, vmax=1 if
                    metric in ("accuracy", "balanced_accuracy", "macro_f1", "auroc") else None)
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
    data = curves[(curves["kind"] == "curve") & (curves["metric"] == metric)]
    g = sns.relplot(data=data, x="step", y="value", hue="stats", col="batch_size", kind="line", marker="o",
                    height=3.2, aspect=1.2, errorbar="sd")
    g.set_axis_labels("training step", metric)
    g.figure.suptitle("EMA vs PreciseBN during training", y=1.04)
    return g.figure


def heldout_bars(table: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Accuracy on each held-out lab, by strategy."""
    data = table[table["is_held_out"].astype(bool) & (table["metric"] == metric)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.barplot(data=data, x="held_out", y="value", hue="strategy", ax=ax, errorbar="sd")
    ax.set_xlabel("held-out lab (never seen in training)")
    ax.set_ylabel(metric)
    ax.set_title("Held-out lab performance by recalibration strategy")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    return fig


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


def _bars(table: pd.DataFrame, x: str, hue: str, title: str, col: str | None = None,
          metric: str = "accuracy") -> plt.Figure:
    data = table[table["metric"] == metric]
    g = sns.catplot(data=data, x=x, y="value", hue=hue, col=col, kind="bar", errorbar="sd", height=3.4,
                    aspect=1.3)
    g.set_axis_labels(x.replace("_", " "), metric)
    g.figure.suptitle(title, y=1.04)
    return g.figure


def study_figure(protocol: str, table: pd.DataFrame) -> plt.Figure:
    """The figure of a study's results, by protocol name (bars or curves; error bars: sd over the rows
    averaged, i.e. over sources and seeds)."""
    if protocol == "held_out_sources":
        return heldout_bars(table)
    if protocol == "ema_vs_precise":
        return ema_curves(table)
    if protocol == "batch_composition":
        return _bars(table, "train_mode", "strategy", "Training batch composition x test statistics", col="batch_size")
    if protocol == "normalization_batch_size":
        data = table[table["metric"] == "accuracy"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        sns.lineplot(data=data, x="ghost_batch", y="value", hue="eval", marker="o", errorbar="sd", ax=ax)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("normalization (ghost) batch size")
        ax.set_ylabel("accuracy")
        ax.set_title("Normalization batch size: population vs mini-batch vs FrozenBN")
        fig.tight_layout()
        return fig
    if protocol == "shared_domains":
        return _bars(table, "train_norm", "test_stats", "Shared BN across domains: train vs test normalization")
    if protocol == "leakage_probe":
        return _bars(table, "composition", "eval", "Batch composition that reveals the label")
    raise ValueError(f"no figure for protocol {protocol!r}")
