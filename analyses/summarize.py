"""Print the tables of analyses/README.md from the result CSVs (mean ± std over seeds).

Run: python analyses/summarize.py [results folder, default analyses/results]
Each CSV is what `shiftbn run analyses/<study>.toml` writes as results.csv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def _fmt(g: pd.DataFrame, index, columns) -> str:
    per_seed = g.groupby([*index, *columns, "seed"])["value"].mean()
    agg = per_seed.groupby(level=list(range(len(index) + len(columns)))).agg(["mean", "std"])
    cell = agg.apply(lambda r: f"{r['mean']:.3f} ± {0 if pd.isna(r['std']) else r['std']:.3f}", axis=1)
    return cell.unstack(list(range(len(index), len(index) + len(columns)))).to_markdown()


def main(folder: Path) -> None:
    read = {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}
    if "held_out" in read:
        h = read["held_out"].query("metric == 'accuracy'")
        print("## held_out: accuracy on the held-out lab\n")
        print(_fmt(h[h["is_held_out"]], ["held_out"], ["strategy"]))
        print("\nmean over held-out labs / over the training labs' test splits\n")
        print(_fmt(h.assign(where=h["is_held_out"].map({True: "held-out lab", False: "training labs"})),
                   ["where"], ["strategy"]))
    if "batch_composition" in read:
        print("\n## batch_composition: accuracy (mean over labs)\n")
        print(_fmt(read["batch_composition"], ["train_mode", "batch_size"], ["strategy"]))
    if "ema_vs_precise" in read:
        e = read["ema_vs_precise"]
        print("\n## ema_vs_precise: accuracy during training\n")
        print(_fmt(e[e["kind"] == "curve"], ["batch_size", "step"], ["stats"]))
        print("\nPreciseBN accuracy vs samples, end of training\n")
        print(_fmt(e[e["kind"] == "samples"], ["batch_size"], ["num_samples"]))
    if "normalization_batch" in read:
        print("\n## normalization_batch: accuracy\n")
        print(_fmt(read["normalization_batch"], ["ghost_batch"], ["eval"]))
    if "shared_domains" in read:
        print("\n## shared_domains: accuracy\n")
        print(_fmt(read["shared_domains"], ["train_norm"], ["test_stats"]))
    if "leakage" in read:
        print("\n## leakage: accuracy\n")
        print(_fmt(read["leakage"], ["composition"], ["eval"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results")
