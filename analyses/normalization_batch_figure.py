"""The paper's three curves (Section 4) against the normalization batch size, with 95% intervals.

Run: python analyses/normalization_batch_figure.py [csv] [png]
(default: analyses/results/normalization_batch_converged.csv -> analyses/figures/normalization_batch_converged.png).
Curves: accuracy on training data with mini-batch statistics (what training sees), on the test split with
mini-batch statistics and with population statistics; FrozenBN dashed. Error bars: the bootstrap intervals of
``shiftbn.studies.intervals.seed_intervals`` (seeds and test samples redrawn), as in the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from shiftbn.studies.intervals import seed_intervals  # noqa: E402

CURVES = {"train_minibatch": ("train, mini-batch statistics", "-"),
          "minibatch": ("test, mini-batch statistics", "-"),
          "population": ("test, population statistics", "-"),
          "frozen": ("test, population statistics after FrozenBN", "--")}


def main(csv: Path, png: Path) -> None:
    rows = pd.read_csv(csv).query("metric == 'accuracy'")
    cells = seed_intervals(rows[rows["eval"].isin(list(CURVES))], ["ghost_batch", "eval"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ev, (label, style) in CURVES.items():
        c = cells[cells["eval"] == ev].sort_values("ghost_batch")
        if c.empty:
            continue
        ax.errorbar(c["ghost_batch"], c["mean"], yerr=[c["mean"] - c["low"], c["high"] - c["mean"]],
                    linestyle=style, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("normalization batch size (ghost batch; SGD batch fixed)")
    ax.set_ylabel("accuracy")
    seeds = rows["seed"].nunique()
    ax.set_title(f"Normalization batch size, {seeds} seeds, 95% intervals")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    here = Path(__file__).parent
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results" / "normalization_batch_converged.csv",
         Path(sys.argv[2]) if len(sys.argv) > 2 else here / "figures" / "normalization_batch_converged.png")
