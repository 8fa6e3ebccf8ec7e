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

from shiftbn.studies import choice_picks, choice_summary, drift_summary
from shiftbn.studies.caseintervals import case_intervals, paired_case_effects
from shiftbn.studies.intervals import format_interval, interval_table, paired_effects, seed_intervals


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


def held_out(h: pd.DataFrame, name: str = "held_out", unit: str = "lab",
             versus: tuple[str, ...] = ("target", "batch:64", "prior:16"), detail: bool = False) -> None:
    """Held-out accuracy per ``unit`` (lab, collection), effects ``versus`` − ema; ``detail``: also the effects
    on each held-out source and the same tables for NLL."""
    everything = h.assign(where=lambda d: d["is_held_out"].map({True: f"held-out {unit}", False: f"training {unit}s"}))
    h = everything.query("metric == 'accuracy'")
    print(f"\n## {name}: accuracy on the held-out {unit}\n")
    print(_table(h[h["is_held_out"]], ["held_out"], ["strategy"]))
    print(f"\nmean over held-out {unit}s / over the training {unit}s' test splits\n")
    print(_table(h, ["where"], ["strategy"]))
    print(f"\neffects (accuracy difference, mean over {unit}s)\n")
    print(_effects([(f"{a} − ema", paired_effects(h, ["where"], "strategy", a, "ema"))
                    for a in versus if a in set(h["strategy"])]))
    if detail:
        print(f"\neffects on each held-out {unit} (accuracy difference)\n")
        held = h[h["is_held_out"]]
        print(_effects([(f"{a} − ema", paired_effects(held, ["held_out"], "strategy", a, "ema"))
                        for a in versus if a in set(held["strategy"])]))
        if {"tent", "batch:64"} <= set(h["strategy"]):  # does Tent's entropy step add to batch statistics?
            print(f"\ntent − batch:64 (accuracy difference, mean over {unit}s and on each held-out {unit})\n")
            print(_effects([("tent − batch:64", paired_effects(h, ["where"], "strategy", "tent", "batch:64")),
                            ("tent − batch:64", paired_effects(held, ["held_out"], "strategy", "tent", "batch:64"))]))
        n = everything.query("metric == 'nll'")
        print(f"\n## {name}: NLL (nats per sample; lower is better), mean over {unit}s\n")
        print(_table(n, ["where"], ["strategy"]))
        print("\neffects (NLL difference; negative: better than ema)\n")
        print(_effects([(f"{a} − ema", paired_effects(n, ["where"], "strategy", a, "ema"))
                        for a in versus if a in set(n["strategy"])]))


def batch_composition(b: pd.DataFrame, name: str = "batch_composition", detail: bool = False) -> None:
    """Accuracy per training mode and batch size (mean over sources); ``detail``: also each source's
    accuracy after single-source training."""
    b = b.query("metric == 'accuracy'") if "metric" in b else b
    print(f"\n## {name}: accuracy (mean over labs)\n")
    print(_table(b, ["train_mode", "batch_size"], ["strategy"]))
    if detail:
        print(f"\n## {name}: accuracy on each source, single-source training batches\n")
        print(_table(b[b["train_mode"] == "single"], ["batch_size", "eval_source"], ["strategy"]))
    print("\neffects\n")
    print(_effects([(f"per-source − {s}", paired_effects(b, ["train_mode", "batch_size"], "strategy", "per-source", s))
                    for s in ("precise", "ema")]))


def ema_vs_precise(e: pd.DataFrame, name: str = "ema_vs_precise") -> None:
    curve = e[e["kind"] == "curve"]
    print(f"\n## {name}: accuracy during training\n")
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


def choice_with_intervals(rows: pd.DataFrame, name: str) -> None:
    """``choice`` plus, per policy, its regret with a seed-level interval, the picks per held-out
    source, and the chooser's regret minus each fixed rule's, paired by seed."""
    choice(rows, name)
    picks = choice_picks(rows).rename(columns={"value": "accuracy"})
    regret = picks.assign(value=picks["regret"], n=float("nan"))  # points; seed-only intervals
    order = list(dict.fromkeys(regret["policy"]))
    cells = seed_intervals(regret, ["policy"]).set_index("policy").reindex(order)
    cells["regret, mean ± std [95% interval]"] = [format_interval(r.mean, r.std, r.low, r.high, 2)
                                                  for r in cells.itertuples()]
    print(f"\n## {name}: regret (accuracy points; mean over held-out sources, then over seeds)\n")
    print(cells[["regret, mean ± std [95% interval]", "seeds"]].to_markdown())
    print(f"\n## {name}: picks (seeds picking each candidate) per held-out source\n")
    counts = picks[picks["policy"].isin(["chooser", "oracle"])].groupby(["held_out", "policy"])["strategy"]
    print(counts.agg(lambda s: ", ".join(f"{k} {v}" for k, v in s.value_counts().sort_index().items()))
          .unstack().to_markdown())
    fixed = [p for p in order if p.startswith("always ")]
    best = min(fixed, key=lambda p: regret.loc[regret["policy"] == p, "value"].mean())
    print(f"\n## {name}: chooser's regret minus each rule's (paired by seed; positive: the chooser loses)\n")
    print(_effects([(f"chooser − {p}" + (" (best fixed rule)" if p == best else ""),
                     paired_effects(regret, [], "policy", "chooser", p)) for p in [*fixed, "atc only"]]))


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
            "seg_held_out_3d": lambda rows: seg_held_out(rows, "seg_held_out_3d (seg-sites-3d, UNet3d)"),
            "held_out_collections": lambda rows: held_out(
                rows, "held_out_collections (digit-collections)", unit="collection",
                versus=("target", "batch:64", "prior:16", "tent", "precise"), detail=True),
            "batch_composition_collections": lambda rows: batch_composition(
                rows, "batch_composition_collections (digit-collections)", detail=True),
            "ema_vs_precise_collections": lambda rows: ema_vs_precise(
                rows, "ema_vs_precise_collections (digit-collections)"),
            "strategy_choice_collections": lambda rows: choice_with_intervals(
                rows, "strategy_choice_collections (digit-collections)")}


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
