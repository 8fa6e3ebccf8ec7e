"""Print the tables of analyses/README.md from the result CSVs, with intervals.

Run: python analyses/summarize.py [results folder, default analyses/results]
Each CSV is what `shiftbn run analyses/<study>.toml` writes as results.csv, saved as <study>.csv.

Every cell reads ``mean ± std [low, high]``: the mean over seeds, the standard deviation over seeds,
and a 95% two-level bootstrap interval (seeds resampled; accuracy rows with a count ``n`` also
redraw their test-sample noise; see ``shiftbn.studies.intervals``). A seed's value is first
averaged over labs where a table does not show labs. Each study ends with its effects: differences
paired by seed with their intervals; ``yes`` in ``excludes 0`` is what analyses/README.md calls
reproduced.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from shiftbn.studies import choice_summary, drift_summary
from shiftbn.studies.caseintervals import case_intervals, paired_case_effects
from shiftbn.studies.intervals import format_interval, interval_table, paired_effects


def _table(rows: pd.DataFrame, index, columns) -> str:
    return interval_table(rows, index, columns).to_markdown()


def _effects(parts: list[tuple[str, pd.DataFrame]]) -> str:
    """One markdown table of named effects (each a ``paired_effects`` frame)."""
    out = []
    for name, eff in parts:
        keys = [c for c in eff.columns if c not in ("effect", "std", "low", "high", "seeds", "supported")]
        for r in eff.itertuples(index=False):
            d = r._asdict()
            where = ", ".join(f"{k}={d[k]}" for k in keys)
            out.append({"effect": name, "where": where or "all",
                        "mean ± std [95% interval]": format_interval(d["effect"], d["std"], d["low"], d["high"]),
                        "seeds": d["seeds"], "excludes 0": "yes" if d["supported"] else "no"})
    return pd.DataFrame(out).to_markdown(index=False)


def held_out(h: pd.DataFrame, name: str = "held_out") -> None:
    h = h.query("metric == 'accuracy'").assign(
        where=lambda d: d["is_held_out"].map({True: "held-out lab", False: "training labs"}))
    print(f"\n## {name}: accuracy on the held-out lab\n")
    print(_table(h[h["is_held_out"]], ["held_out"], ["strategy"]))
    print("\nmean over held-out labs / over the training labs' test splits\n")
    print(_table(h, ["where"], ["strategy"]))
    print("\neffects (accuracy difference, mean over labs)\n")
    print(_effects([(f"{a} − ema", paired_effects(h, ["where"], "strategy", a, "ema"))
                    for a in ("target", "batch:64", "prior:16") if a in set(h["strategy"])]))


def batch_composition(b: pd.DataFrame, name: str = "batch_composition") -> None:
    b = b.query("metric == 'accuracy'") if "metric" in b else b
    print(f"\n## {name}: accuracy (mean over labs)\n")
    print(_table(b, ["train_mode", "batch_size"], ["strategy"]))
    print("\neffects\n")
    print(_effects([(f"per-source − {s}", paired_effects(b, ["train_mode", "batch_size"], "strategy", "per-source", s))
                    for s in ("precise", "ema")]))


def ema_vs_precise(e: pd.DataFrame) -> None:
    curve = e[e["kind"] == "curve"]
    print("\n## ema_vs_precise: accuracy during training\n")
    print(_table(curve, ["batch_size", "step"], ["stats"]))
    print("\nPreciseBN accuracy vs samples, end of training\n")
    print(_table(e[e["kind"] == "samples"], ["batch_size"], ["num_samples"]))
    print("\neffects\n")
    print(_effects([("precise − ema", paired_effects(curve, ["batch_size", "step"], "stats", "precise", "ema"))]))


def normalization_batch(n: pd.DataFrame, name: str = "normalization_batch") -> None:
    print(f"\n## {name}: accuracy\n")
    print(_table(n, ["ghost_batch"], ["eval"]))
    print("\neffects\n")
    pairs = [("minibatch", "population"), ("frozen", "population"), ("frozen", "extra_steps"),
             ("extra_steps", "population"), ("train_minibatch", "train_population"), ("train_minibatch", "minibatch")]
    print(_effects([(f"{a} − {b}", paired_effects(n, ["ghost_batch"], "eval", a, b))
                    for a, b in pairs if {a, b} <= set(n["eval"])]))


def shared_domains(s: pd.DataFrame) -> None:
    print("\n## shared_domains: accuracy\n")
    print(_table(s, ["train_norm"], ["test_stats"]))
    print("\neffects (consistent − inconsistent test statistics)\n")
    parts = []
    for train_norm, other in (("joint", "per-domain"), ("per-domain", "joint")):
        part = s[s["train_norm"] == train_norm]
        parts.append((f"{train_norm} − {other}", paired_effects(part, ["train_norm"], "test_stats", train_norm, other)))
    print(_effects(parts))


def leakage(bl: pd.DataFrame) -> None:
    print("\n## leakage (bags): accuracy\n")
    print(_table(bl, ["arm"], ["eval"]))
    print("\neffects\n")
    parts = [("bags − population", paired_effects(bl, ["arm"], "eval", "bags", "population")),
             ("train_batches − population", paired_effects(bl, ["arm"], "eval", "train_batches", "population"))]
    pop = bl[bl["eval"] == "population"]
    for arm in sorted(set(bl["arm"]) - {"grouped"}):
        parts.append((f"population: {arm} − grouped", paired_effects(pop, [], "arm", arm, "grouped")))
    print(_effects(parts))


def leakage_probe(lp: pd.DataFrame) -> None:
    print("\n## leakage_probe (negative control): accuracy\n")
    print(_table(lp, ["composition"], ["eval"]))
    print("\neffects\n")
    print(_effects([(f"{a} − test_population", paired_effects(lp, ["composition"], "eval", a, "test_population"))
                    for a in ("test_same_composition", "train_batches")]))


def choice(rows: pd.DataFrame, name: str) -> None:
    print(f"\n## {name}: label-free strategy choice (regret and MAE in accuracy points)\n")
    print(choice_summary(rows).to_markdown(index=False, floatfmt=".2f"))


def drift(rows: pd.DataFrame, name: str) -> None:
    print(f"\n## {name}: drift detection\n")
    print(drift_summary(rows).to_markdown(index=False, floatfmt=".3f"))


def _seg_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-case segmentation rows with ``row`` (strategy, and its mode and stream when online) and ``where``."""
    rows = rows.assign(stream=rows["stream"].fillna(""))
    label = rows["strategy"] + rows["mode"].map({"offline": "", "online": " (online"}) + \
        rows["stream"].map(lambda s: f", {s})" if s else "")
    return rows.assign(row=label, where=rows["is_held_out"].map({True: "held-out site", False: "training sites"}))


def seg_held_out(rows: pd.DataFrame, name: str) -> None:
    """Segmentation held-out site: means with two-level (seed, case) intervals and paired effects vs ema."""
    rows = _seg_rows(rows)
    order = list(dict.fromkeys(rows["row"]))
    cells = case_intervals(rows, ["where", "row", "metric"])
    cells["text"] = [format_interval(r.mean, r.std, r.low, r.high, 3 if r.metric.startswith("dice") else 2)
                     for r in cells.itertuples()]
    for where in ("held-out site", "training sites"):
        part = cells[cells["where"] == where]
        wide = part.pivot(index="row", columns="metric", values="text").reindex(order)
        counts = part.drop_duplicates("row").set_index("row")[["n", "seeds"]].reindex(order)
        wide["cases"] = counts["n"].astype(int)  # case rows of one metric, over held-out sites and seeds
        wide["seeds"] = counts["seeds"]
        print(f"\n## {name}: {where} (mean over held-out sites of the case mean)\n")
        print(wide.to_markdown())
    held = rows[rows["is_held_out"]]
    per_site = case_intervals(held, ["held_out", "row", "metric"])
    per_site = per_site[per_site["metric"] == "dice"]
    per_site["text"] = [format_interval(r.mean, r.std, r.low, r.high) for r in per_site.itertuples()]
    print(f"\n## {name}: Dice on each held-out site\n")
    print(per_site.pivot(index="row", columns="held_out", values="text").reindex(order).to_markdown())
    print(f"\n## {name}: effects (paired by seed and case; row − ema)\n")
    out = []
    for metric in [m for m in ("dice", "dice:2", "hd95") if m in set(rows["metric"])]:
        part = rows[rows["metric"] == metric]
        for row in order:
            if row == "ema":
                continue
            eff = paired_case_effects(part, ["where"], "row", row, "ema")
            for r in eff.itertuples():
                out.append({"row": row, "metric": metric, "where": r.where,
                            "effect [95% interval]": format_interval(r.effect, r.std, r.low, r.high),
                            "cases": r.n, "seeds": r.seeds, "excludes 0": "yes" if r.supported else "no"})
    print(pd.DataFrame(out).to_markdown(index=False))
    online = [r for r in order if "(online, site)" in r or "(online, sequence)" in r]
    pairs = [(r, "batch (online, case)") for r in online] + \
        [(r.replace("site)", "sequence)"), r) for r in online if r.endswith("site)")]
    out = []
    for a, b in pairs:
        if not {a, b} <= set(order):
            continue
        for metric in [m for m in ("dice", "hd95") if m in set(rows["metric"])]:
            eff = paired_case_effects(rows[rows["metric"] == metric], ["where"], "row", a, b)
            for r in eff.itertuples():
                out.append({"effect": f"{a} − {b}", "metric": metric, "where": r.where,
                            "effect [95% interval]": format_interval(r.effect, r.std, r.low, r.high),
                            "cases": r.n, "seeds": r.seeds, "excludes 0": "yes" if r.supported else "no"})
    if out:
        print(f"\n## {name}: online Tent against per-case batch statistics, and carried across sites\n")
        print(pd.DataFrame(out).to_markdown(index=False))
    if "seconds" in rows:
        t = rows.drop_duplicates(["seed", "held_out", "eval_source", "row"]).groupby("row")["seconds"].sum()
        cells_run = rows.drop_duplicates(["seed", "held_out"]).shape[0]
        print(f"\n## {name}: seconds per trained model (all sites' test cases), mean over {cells_run} models\n")
        print((t / cells_run).reindex(order).round(1).to_markdown())


SECTIONS = {"held_out": held_out, "batch_composition": batch_composition, "ema_vs_precise": ema_vs_precise,
            "held_out_c": lambda rows: held_out(rows, "held_out_c (fashion-mnist-c)"),
            "held_out_digits_c": lambda rows: held_out(rows, "held_out_digits_c (digits-c)"),
            "batch_composition_c": lambda rows: batch_composition(rows, "batch_composition_c (fashion-mnist-c)"),
            "normalization_batch": normalization_batch,
            "normalization_batch_digits": lambda rows: normalization_batch(rows, "normalization_batch_digits"),
            "normalization_batch_converged": lambda rows: normalization_batch(rows, "normalization_batch_converged"),
            "shared_domains": shared_domains, "leakage": leakage,
            "leakage_probe": leakage_probe,
            "strategy_choice": lambda rows: choice(rows, "strategy_choice (digits-labs)"),
            "strategy_choice_fashion": lambda rows: choice(rows, "strategy_choice_fashion (fashion-mnist-labs)"),
            "drift": lambda rows: drift(rows, "drift (digits-labs)"),
            "drift_fashion": lambda rows: drift(rows, "drift_fashion (fashion-mnist-labs)"),
            "seg_held_out_2d": lambda rows: seg_held_out(rows, "seg_held_out_2d (seg-sites-2d, UNet2d)"),
            "seg_held_out_3d": lambda rows: seg_held_out(rows, "seg_held_out_3d (seg-sites-3d, UNet3d)")}


def _renamed(rows: pd.DataFrame) -> pd.DataFrame:
    """Results written before the strategy ``source`` was spelled ``ema`` read with the new name."""
    if "strategy" in rows:
        rows = rows.assign(strategy=rows["strategy"].replace({"source": "ema"}))
    return rows


def main(folder: Path) -> None:
    read = {p.stem: _renamed(pd.read_csv(p)) for p in sorted(folder.glob("*.csv"))}
    for stem, section in SECTIONS.items():
        if stem in read:
            section(read[stem])
    for stem in sorted(set(read) - set(SECTIONS)):
        rows = read[stem]
        if "metric" in rows:  # never average different metrics into one cell
            rows = rows[rows["metric"] == ("accuracy" if "accuracy" in set(rows["metric"]) else rows["metric"].iloc[0])]
        keys = [c for c in rows.columns if c not in ("value", "seed", "n", "metric")][:2]
        if len(keys) == 2:
            print(f"\n## {stem}\n")
            print(_table(rows, keys[:1], keys[1:]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results")
