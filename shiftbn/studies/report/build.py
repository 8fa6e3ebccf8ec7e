"""The report for any model and data (``build_report``) and the one writer the demo shares (``render_report``).

Why: users ask the demo's questions of their own model: which sources shift it, in which layers, what
each recalibration does per source, with honest intervals, and how calibration and classes fare. Headings
and sentences call a source by the data's own word (``SourceTaggedDataset.source_word``).
"""

from __future__ import annotations

import datetime
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from shiftbn._io import atomic_write_text
from shiftbn._version import __version__
from shiftbn.adapt import parse_strategy
from shiftbn.bn import stats_shift
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import collect, paired_table, pooled_table, prepare, score, summarize
from shiftbn.evaluate.matrix import calibration_split
from shiftbn.evaluate.summary import interval_cells
from shiftbn.evaluate.task import DEFAULT_METRICS, infer_task
from shiftbn.studies.report.calibration import (
    calibration_table,
    confusion_figure,
    per_class_table,
    reliability_diagrams,
)
from shiftbn.studies.report.decisions import decision_sections
from shiftbn.studies.report.figures import ema_curves, heldout_bars, lab_samples, matrix_heatmap, save, shift_profile
from shiftbn.studies.report.html import write_report
from shiftbn.studies.report.label_free import label_free_panel, label_free_sections, validate_chooser
from shiftbn.studies.report.reading import findings, plural
from shiftbn.studies.report.recommend import decision_caption, decision_lines, decision_table, labels_status
from shiftbn.studies.report.segmentation import display

REPORT_STRATEGIES = ("ema", "precise", "target", "prior:16", "stats:*")
DECISION_TITLE = "Decision per {word}"


@dataclass
class ReportExtras:
    """What ``build_report`` adds to the demo's page: ``decisions`` (``recommend.decision_table``), the
    label-free panels of unlabeled sites (site -> ``LabelFree``) and ``ece``: paired ECE changes of each
    strategy against ema per site (``eval_source, strategy, before, after, diff, ci_low, ci_high``)."""

    decisions: pd.DataFrame | None = None
    label_free: dict = field(default_factory=dict)
    ece: pd.DataFrame | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    figures: dict = field(default_factory=dict)


PAIRED_TITLE = "Paired differences to the stored statistics (ema)"


@dataclass
class Outputs:
    """Model outputs kept for paired comparisons and calibration: ``(strategy, source) -> (N, K)`` logits,
    each source's labels (same order) and the class names."""

    outputs: dict[tuple[str, str], np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: Sequence[str] | None = None
    strategies: list[str] = field(default_factory=list)


def _pivot_text(c: pd.DataFrame, index: str, columns: str) -> pd.DataFrame:
    grid = c.pivot_table(index=index, columns=columns, values="cell", aggfunc="first", sort=False)
    ns = c.groupby(columns, sort=False)["n"].first()
    grid.columns = [f"{col} (n={int(ns[col])})" for col in grid.columns]
    return grid.reset_index()


def render_report(out_dir: str | Path, *, title: str, meta: dict[str, str], matrix: pd.DataFrame,
                  shift: pd.DataFrame, samples: SourceTaggedDataset | None = None, held_out: Sequence[str] = (),
                  heldout: pd.DataFrame | None = None, ema: pd.DataFrame | None = None,
                  comparisons: pd.DataFrame | None = None, pooled: pd.DataFrame | None = None,
                  outputs: Outputs | None = None, num_classes: int | None = None, level: float = 0.95,
                  n_boot: int = 1000, seed: int = 0, notes: dict[str, str] | None = None,
                  decisions: dict[str, pd.DataFrame | str | None] | None = None, word: str | None = None,
                  extra: ReportExtras | None = None) -> Path:
    """Write ``out_dir/report.html`` (figures also as ``out_dir/figures/*.png``) from tidy tables.

    The demo and ``build_report`` both call this. ``matrix``: ``cross_source_matrix`` rows (with
    ``ci_low``/``ci_high``: intervals shown); ``shift``: ``stats_shift`` rows; ``samples``: data for the
    sample-image grid (images only); ``held_out``: sources the model never saw (marked in the matrix);
    ``heldout``: ``HeldOutSources`` rows (retrained models; the demo); ``ema``: EMA vs PreciseBN rows;
    ``comparisons``/``pooled``: ``paired_table``/``pooled_table`` rows; ``outputs``: kept outputs, for
    per-source calibration and confusion; ``notes``: extra captions by section name (a note for the
    held-out section without ``heldout`` is shown alone, e.g. how to get it); ``decisions``: the
    decision panels' tables (``sites``, ``drift``, ``drift_layers``, ``reference``, ``audit``; see
    ``report.decisions``); ``word``: what the data calls a source (default ``samples.source_word``,
    else "source"), used in headings and sentences; ``extra``: the decision per site (shown first),
    unlabeled sites' label-free panels and what the reading adds (``ReportExtras``; its ``metrics``: the
    task's metrics, the first one the score, and ``figures``: heading -> (figure, file) shown after the
    matrix, e.g. the segmentation report's per-case distributions and overlays).
    """
    extra = extra or ReportExtras()
    if word is None:
        word = samples.source_word if samples is not None else "source"
    words = plural(word)
    out_dir = Path(out_dir)
    figs_dir = out_dir / "figures"
    figs_dir.mkdir(parents=True, exist_ok=True)
    w2 = shift[shift["metric"] == "w2"] if "metric" in shift else shift
    figures: dict = {}
    captions = dict(notes or {})
    if samples is not None:
        heading = f"Sample images per {word}"
        figures[heading] = (lab_samples(samples, seed=seed, word=word), "samples.png")
        captions.setdefault(heading, f"Each {word}'s row is scaled to that {word}'s own 1st-99th percentile of "
                            f"intensities (printed at the row), so no {word} renders near-black; compare the printed "
                            f"ranges, not the grey levels, across {words}.")
    metrics = extra.metrics
    for m in metrics:
        if (matrix["metric"] == m).any():  # no labeled source: no cell to draw (label-free panels follow)
            heading = f"Cross-source matrix ({m})"
            figures[heading] = (matrix_heatmap(matrix, metric=m, held_out=held_out),
                                "matrix.png" if m == metrics[0] else f"matrix_{m.replace(':', '_')}.png")
            captions.setdefault(heading, _matrix_caption(matrix, held_out, level, word))
    figures.update(extra.figures)
    figures["Layer shift profile (W2 to pooled statistics)"] = (shift_profile(w2, word=word), "shift_profile.png")
    if heldout is not None:
        figures[f"Held-out {words}"] = (heldout_bars(heldout, word=word), "heldout.png")
    elif captions.get(f"Held-out {words}"):  # not run: the section keeps its heading and says how to get it
        figures[f"Held-out {words}"] = (None, None)
    if ema is not None:
        figures["EMA vs PreciseBN"] = (ema_curves(ema), "ema_vs_precise.png")
    if outputs is not None:
        sites = [s for s in outputs.labels]
        figures[f"Calibration per {word}"] = (reliability_diagrams(outputs.outputs, outputs.labels, sites, word=word),
                                              "reliability.png")
        figures[f"Confusion per {word}"] = (confusion_figure(outputs.outputs, outputs.labels, sites, "ema",
                                                             class_names=outputs.class_names, word=word),
                                            "confusion.png")
    paths = {}
    for name, (fig, file) in figures.items():
        if fig is None:
            paths[name] = None
            continue
        save(fig, figs_dir / file)
        paths[name] = figs_dir / file
    tables = _tables(matrix, heldout, comparisons, pooled, outputs, held_out, level, n_boot, seed, word, metrics)
    captions.update(_table_captions(level, word, metrics))
    if decisions:
        panel_tables, panel_captions = decision_sections(decisions.get("sites"), decisions.get("drift"),
                                                         decisions.get("drift_layers"), decisions.get("reference"),
                                                         decisions.get("audit"), word=word)
        tables.update(panel_tables)
        captions.update(panel_captions)
    panels, panel_captions = label_free_sections(extra.label_free, word)
    tables.update(panels)
    captions.update(panel_captions)
    lead = {}
    if extra.decisions is not None and len(extra.decisions):
        title_d = DECISION_TITLE.format(word=word)
        lead[title_d] = extra.decisions.drop(columns=["strategy"])
        captions[title_d] = decision_caption(word, level, metrics)
    reading = findings(matrix, heldout, w2, metrics[0], comparisons=comparisons, pooled=pooled, num_classes=num_classes,
                       held_out=held_out, level=level, word=word, ece=extra.ece, decisions=extra.decisions,
                       unlabeled=list(extra.label_free))
    return write_report(out_dir / "report.html", title=title, summary=reading, figures=paths, tables=tables,
                        meta=meta, captions=captions, lead=lead)


def _matrix_caption(matrix: pd.DataFrame, held_out: Sequence[str], level: float, word: str) -> str:
    text = (f"Rows: strategy (left) or the {word} whose statistics are used (right); columns: the {word} evaluated. ")
    if "ci_low" in matrix:
        text += (f"Each cell: value and {level:.0%} bootstrap interval over that {word}'s evaluation samples "
                 f"(resampled within the {word}; sample counts in the tables below). ")
    scored = [h for h in held_out if h in set(matrix["eval_source"])]  # an unlabeled source has no cell
    if scored:
        text += f"Outlined in red: {', '.join(scored)}, never seen in training (the held-out view)."
    return text


def _table_captions(level: float, word: str, metrics: Sequence[str] = ("accuracy",)) -> dict[str, str]:
    words = plural(word)
    dense = {f"{display(m)} by strategy and {word}": f"Cells: mean {display(m)} over cases [{level:.0%} bootstrap "
             "interval, resampling cases]; n = evaluation cases." for m in metrics if m != "accuracy"}
    return {**dense,
        f"Accuracy by strategy and {word}": f"Cells: accuracy [{level:.0%} bootstrap interval]; n = evaluation "
                                            "samples.",
        f"Summary over {words}": (f"Pooled over {words}, resampled within each {word} (stratified bootstrap); diff: "
                                  "paired difference to the stored statistics (ema)."),
        PAIRED_TITLE: (
            f"Strategy minus ema on each {word}, same resampled samples for both (paired {level:.0%} interval); "
            "~0 marks an interval that includes 0 (no supported difference)."),
        f"Calibration (ECE) per {word}": (f"ECE (15 bins) with the model's own statistics (before, ema) and the "
                                          f"{word}'s own statistics (after, target/AdaBN); change = after - before, "
                                          "paired interval."),
        f"Per-class recall per {word}": f"Recall of each class (sklearn confusion_matrix); n = samples of that class "
                                        f"at that {word}.",
    }


def _tables(matrix, heldout, comparisons, pooled, outputs, held_out, level, n_boot, seed,
            word: str = "source", metrics: Sequence[str] = ("accuracy",)) -> dict[str, pd.DataFrame]:
    words = plural(word)
    main = matrix[~matrix["is_cross_source"].astype(bool)]
    acc = main[main["metric"] == metrics[0]]
    if not len(acc):
        return {}
    tables = {f"{display(m)} by strategy and {word}": interval_cells(main[main["metric"] == m], "strategy",
                                                                      "eval_source")
              for m in metrics if (main["metric"] == m).any()}
    if pooled is not None and len(pooled):
        tables[f"Summary over {words}"] = pooled.drop(columns=["metric", "level"], errors="ignore")
    else:
        tables[f"Summary over {words}"] = summarize(matrix[~matrix["is_cross_source"].astype(bool)])
    if comparisons is not None and len(comparisons):
        c = comparisons.copy()
        c["cell"] = (c["diff"].map("{:+.3f}".format) + " [" + c["ci_low"].map("{:+.3f}".format) + ", "
                     + c["ci_high"].map("{:+.3f}".format) + "]")
        c.loc[(c["ci_low"] <= 0) & (c["ci_high"] >= 0), "cell"] += " ~0"
        tables[PAIRED_TITLE] = _pivot_text(c, "strategy", "eval_source")
    if held_out:
        rows = acc[acc["eval_source"].isin(list(held_out))]
        if len(rows):  # a held-out source without labels has no accuracy (its label-free panel follows)
            tables[f"Held-out {words} ({metrics[0]})"] = interval_cells(rows, "strategy", "eval_source")
    if heldout is not None and len(heldout):
        h = heldout[heldout["is_held_out"].astype(bool) & (heldout["metric"] == "accuracy")]
        table = h.pivot_table(index="held_out", columns="strategy", values="value", sort=False)
        tables[f"Held-out {words}, each in a model retrained without it (accuracy)"] = table.assign(
            n=h.groupby("held_out")["n"].first())
    if outputs is not None:
        sites = list(outputs.labels)
        ece = calibration_table(outputs.outputs, outputs.labels, sites, n_boot=n_boot, level=level, seed=seed)
        tables[f"Calibration (ECE) per {word}"] = ece.rename(columns={"site": word})
        pc = per_class_table(outputs.outputs, outputs.labels, sites, ["ema", "target"], outputs.class_names)
        if len(pc):
            tables[f"Per-class recall per {word}"] = pc.pivot_table(
                index=["site", "class", "n"], columns="strategy", values="recall", sort=False).reset_index().rename(
                columns={"site": word})
    return tables


def matrix_with_outputs(model: nn.Module, ds: SourceTaggedDataset, strategies: Sequence[str],
                        metrics: Sequence[str] = ("accuracy", "nll", "ece"), *, calibration=0.5,
                        train_sources: Sequence[str] | None = None, ci: float | None = 0.95, n_boot: int = 1000,
                        batch_size: int = 256, stats_batch_size: int = 64, num_samples: int | None = None,
                        seed: int = 0, amp: bool = False, progress: bool = True,
                        forward=None) -> tuple[pd.DataFrame, Outputs]:
    """``cross_source_matrix`` (same arguments, same numbers) plus the outputs of every non-cross-source
    cell, for paired comparisons and calibration (segmentation: the per-case rows, never dense outputs).
    Returns ``(matrix, Outputs)``."""
    return _matrix_ctx(model, ds, strategies, metrics, calibration=calibration, train_sources=train_sources, ci=ci,
                       n_boot=n_boot, batch_size=batch_size, stats_batch_size=stats_batch_size,
                       num_samples=num_samples, seed=seed, amp=amp, progress=progress, forward=forward)[:2]


def _matrix_ctx(model, ds, strategies, metrics, *, calibration, train_sources, ci, n_boot, batch_size,
                stats_batch_size, num_samples, seed, amp, progress, forward):
    """``matrix_with_outputs``'s result, then the strategies' context and the plan (for the overlays' pass)."""
    plan = prepare(ds, list(strategies), calibration=calibration, train_sources=train_sources, seed=seed)
    ctx, labels = collect(model, plan, batch_size=batch_size, stats_batch_size=stats_batch_size,
                          num_samples=num_samples, seed=seed, amp=amp, progress=progress, forward=forward)
    kept: dict = {}
    matrix = score(ctx, plan, labels, list(metrics), ci=ci, n_boot=n_boot, progress=progress, keep_outputs=kept)
    names = [st.name for st in plan.strategies if not st.cross_source]
    kept = {key: v for key, v in kept.items() if key[0] in names}
    return matrix, Outputs(kept, labels, ds.class_names, names), ctx, plan


def comparison_tables(outputs: Outputs, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                      metric: str = "accuracy") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``paired_table`` (each strategy minus ema, per source) and ``pooled_table`` (stratified over sources)."""
    sites = list(outputs.labels)
    return (paired_table(outputs.outputs, outputs.labels, outputs.strategies, sites, metric=metric, n_boot=n_boot,
                         level=level, seed=seed),
            pooled_table(outputs.outputs, outputs.labels, outputs.strategies, sites, metric=metric, n_boot=n_boot,
                         level=level, seed=seed))


def build_report(model: nn.Module, ds: SourceTaggedDataset, out: str | Path, *, held_out: Sequence[str] | None = None,
                 strategies: Sequence[str] = REPORT_STRATEGIES, calibration: float = 0.5, ci: float | None = 0.95,
                 n_boot: int = 1000, batch_size: int = 256, stats_batch_size: int = 64,
                 num_samples: int | None = None, seed: int = 0, amp: bool = False, progress: bool = True,
                 title: str | None = None, unlabeled: Sequence[str] | None = None,
                 provenance: Mapping[str, str] | None = None, command: str | None = None, forward=None) -> Path:
    """Write the demo's report for your model and data into ``out`` (``report.html``, figures, CSVs).

    Why: the same questions as the demo, asked of a trained model: per-source BN statistics and the layer
    shift profile, the cross-source matrix with bootstrap intervals (``ci``; None: none), paired
    intervals of every strategy against the stored statistics (``ema``), per-source calibration and
    confusion, and a reading that claims only differences its intervals support. No training happens:
    ``held_out`` names sources the model was trained without (their matrix rows are the held-out view);
    ``precise`` pools the other sources. ``calibration``: fraction of each source used unlabeled for
    statistics (the rest is evaluated). Headings say ``ds.source_word`` ("hospital" for a manifest
    column ``hospital``). Returns the path of ``report.html``. The model is not changed.

    The page opens with a decision per source (``report.json`` holds it too): the statistics to deploy,
    why, what it costs and the next command. A source without labels (class label -1, or named in
    ``unlabeled``) gets no label metric; its label-free panel shows the shift per layer, per-strategy
    indicators, the drift test and ``choose_strategy``'s pick. A partly labeled source is scored on
    its labeled part; its statistics use all of it. ``provenance``: model, checkpoint, checkpoint_sha256
    and data as the title and ``report.json`` name them (default: the model's class and the in-memory
    weights' digest). ``command``: ``shiftbn recalibrate`` with the model and data options, the start of
    each next command (default: placeholders).

    Segmentation data (a label map per sample, ``evaluate.task.infer_task``) gets a segmentation report:
    Dice and HD95 matrices with case-level intervals, per-case distributions per source and strategy,
    overlays of prediction vs ground truth for the first two evaluation cases of each source under ema,
    target and precise (middle slice of 3-D cases; a separate pass over those cases only), and the
    decision table with Dice as the score. Calibration, confusion and per-class recall need class
    predictions and are left out (the report says so); so are label-free panels (``unlabeled`` is
    refused). ``forward``: the user's ``forward(model, x)``, used by every pass over the model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    held = [str(h) for h in (held_out or [])]
    for h in [*held, *(unlabeled or [])]:
        ds.source_id(h)
    dense = infer_task(ds) == "segmentation"
    if dense and unlabeled:
        raise ValueError(f"unlabeled (--unlabeled) {list(unlabeled)}: the label-free panel reads class predictions, "
                         "which a segmenter does not make; evaluate only sources with masks (leave the others out of "
                         "the data)")
    if unlabeled:
        ds = ds.without_labels([str(u) for u in unlabeled])
    ds, skipped = _sites_with_both_parts(ds, calibration, seed)
    held = [h for h in held if h not in skipped]
    trains = [s for s in ds.sources_present if s not in held]
    if not trains:
        raise ValueError(f"--held-out names every source ({held}); leave at least one source the model was trained "
                         "on")
    if all(parse_strategy(s).cross_source for s in ([strategies] if isinstance(strategies, str) else strategies)):
        raise ValueError("the report needs at least one strategy that is not stats:<source> (e.g. ema, target)")
    scores = tuple(DEFAULT_METRICS["segmentation"]) if dense else ("accuracy",)
    matrix, everything, ctx, plan = _matrix_ctx(model, ds, strategies, scores if dense else ("accuracy", "nll", "ece"),
                                                calibration=calibration, train_sources=trains, ci=ci, n_boot=n_boot,
                                                batch_size=batch_size, stats_batch_size=stats_batch_size,
                                                num_samples=num_samples, seed=seed, amp=amp, progress=progress,
                                                forward=forward)
    stats = ctx.stats  # the calibration part's per-source statistics: target's, computed once for both
    shift = stats_shift(stats, metric="all")
    status = labels_status(everything.labels)
    kept = _labeled_part(everything, status)
    level = ci if ci is not None else 0.95
    comparisons = pooled = ece = None
    if ci is not None and kept.labels:
        comparisons, pooled = comparison_tables(kept, n_boot=n_boot, level=level, seed=seed, metric=scores[0])
        ece = None if dense else ece_changes(kept, n_boot=n_boot, level=level, seed=seed)
    word = ds.source_word
    names, labels = kept.strategies, kept.labels
    k = next(iter(everything.outputs.values())).shape[1]
    run = {"batch_size": batch_size, "stats_batch_size": stats_batch_size, "amp": amp, "forward": forward}
    panels = _label_free(model, ds, everything, status, trains, shift, calibration, seed, word, run)
    prov = dict(provenance) if provenance is not None else default_provenance(model, ds)
    prov.setdefault("date", datetime.date.today().isoformat())
    prov.setdefault("shiftbn_version", __version__)
    base = command or "shiftbn recalibrate --model MODULE:FACTORY --weights CHECKPOINT --data DATA"
    decisions = decision_table(ds.sources_present, status, comparisons=comparisons, outputs=kept.outputs,
                               labels=kept.labels, label_free=panels, base=base, class_names=ds.class_names,
                               level=level, n_boot=n_boot, seed=seed, word=word, metrics=scores)
    figures, notes = _segmentation_figures(model, ctx, plan, kept, scores, word, forward, out) if dense else ({}, {})
    atomic_write_text(out / "stats.json", json.dumps(stats.to_dict()))
    for name, table in (("matrix", matrix), ("comparisons", comparisons), ("pooled", pooled), ("shift", shift)):
        if table is not None:
            table.to_csv(out / f"{name}.csv", index=False)
    atomic_write_text(out / "report.json", json.dumps({
        "provenance": prov, "labels": status, "held_out": held,
        "decisions": decisions.rename(columns={word: "source"}).to_dict("records"),
        "decision_lines": decision_lines(decisions, word)}, indent=1))
    x0 = ds[0][0]
    images = hasattr(x0, "ndim") and x0.ndim >= 2 and not dense  # segmentation: the overlays show the images
    meta = {**{f"{key.replace('_', ' ')}": str(v) for key, v in prov.items()},
            plural(word): ", ".join(ds.sources_present),
            "held out (never trained on)": ", ".join(held) or "none",
            "strategies": " ".join(names),
            "evaluation cases" if dense else "labeled evaluation samples": str(sum(len(v) for v in labels.values())),
            "bootstrap": f"{n_boot} resamples, {level:.0%}" if ci is not None else "off", "seed": str(seed)}
    unl = [s for s, v in status.items() if v == "none"]
    part = {s: v for s, v in status.items() if v not in ("all", "none")}
    if unl:
        meta["without labels (no label metric; label-free panel)"] = ", ".join(unl)
    if part:
        meta["partly labeled (scored on the labeled part; statistics from all samples)"] = "; ".join(
            f"{s}: {v} evaluation samples labeled" for s, v in part.items())
    if skipped:
        meta[f"{word}s skipped"] = "; ".join(f"{site} ({why})" for site, why in skipped.items())
    return render_report(out, title=title or provenance_title(prov), meta=meta, matrix=matrix,
                         shift=shift, samples=ds if images else None, held_out=held, comparisons=comparisons,
                         pooled=pooled, outputs=kept if kept.labels and not dense else None,
                         num_classes=None if dense else k, level=level, n_boot=n_boot, seed=seed, word=word,
                         notes=notes or None,
                         extra=ReportExtras(decisions=decisions, label_free=panels, ece=ece, metrics=scores,
                                            figures=figures))


SEG_DISTRIBUTIONS = "Per-case distributions per {word}"
SEG_OVERLAYS = "Prediction vs ground truth"
SEG_SKIPPED = "Calibration and confusion"


def _segmentation_figures(model, ctx, plan, kept: Outputs, scores, word: str, forward, out: Path) -> tuple[dict, dict]:
    """The segmentation report's figures (heading -> (figure, file)) and their captions; writes cases.csv.

    Why: a mean Dice hides the cases a strategy fails on (the distributions) and what the failure looks
    like (the overlays: one extra pass over two cases per source with each main strategy's statistics).
    """
    from shiftbn.evaluate.dense import case_values
    from shiftbn.studies.report import segmentation as seg

    cases = seg.case_table(kept.outputs, scores, kept.strategies)
    atomic_write_text(out / "cases.csv", cases.to_csv(index=False))
    shown_strategies = seg.overlay_strategies(kept.strategies)
    parts = {s: plan.evaluation.subset(s) for s in plan.eval_sources}
    shown = seg.overlay_cases(model, ctx, parts, shown_strategies, forward=forward,
                              batch_size=ctx.batch_size)
    dice = {key: case_values("dice", rows) for key, rows in kept.outputs.items()}
    dist = SEG_DISTRIBUTIONS.format(word=word)
    figures = {dist: (seg.case_distributions(cases, scores, word), "cases.png"),
               SEG_OVERLAYS: (seg.overlay_figure(shown, shown_strategies, dice, word), "overlays.png"),
               SEG_SKIPPED: (None, None)}
    notes = {dist: (f"Each dot is one evaluation case of that {word} under that strategy (cases.csv); boxes: "
                    "quartiles and median. A mean can hide a few failed cases: look for dots far below the box."),
             SEG_OVERLAYS: (f"The first {min(2, max((len(p) for p in parts.values()), default=0))} evaluation cases "
                            f"of each {word} under {', '.join(shown_strategies)} (columns), each with its "
                            "statistics; the case's Dice in the title."),
             SEG_SKIPPED: seg.SKIPPED_SENTENCE}
    return figures, notes


def provenance_title(prov: Mapping[str, str]) -> str:
    """The report's title: model, checkpoint and its sha256, data, date, shiftbn version."""
    return (f"shiftbn report: model {prov.get('model')}, checkpoint {prov.get('checkpoint')} (sha256 "
            f"{prov.get('checkpoint_sha256')}), data {prov.get('data')}, {prov.get('date')}, shiftbn "
            f"{prov.get('shiftbn_version')}")


def default_provenance(model: nn.Module, ds: SourceTaggedDataset) -> dict[str, str]:
    """Provenance for a model and data given as objects: the class, the digest of the in-memory weights."""
    from shiftbn.sites.fingerprint import model_fingerprint

    cls = type(model)
    return {"model": f"{cls.__module__}.{cls.__qualname__}", "checkpoint": "in memory (no file)",
            "checkpoint_sha256": model_fingerprint(model)["weights_sha256"],
            "data": f"{len(ds)} samples, {len(ds.sources_present)} {plural(ds.source_word)} (given as an object)"}


def _labeled_part(outputs: Outputs, status: Mapping[str, str]) -> Outputs:
    """``outputs`` restricted to labeled samples: partly labeled sites keep their labeled part, unlabeled ones go."""
    labels, kept = {}, {}
    for site, y in outputs.labels.items():
        if status[site] == "none":
            continue
        keep = np.asarray(y) >= 0 if status[site] != "all" else slice(None)
        labels[site] = np.asarray(y)[keep]
        kept.update({key: v[keep] for key, v in outputs.outputs.items() if key[1] == site})
    return Outputs(kept, labels, outputs.class_names, outputs.strategies)


def ece_changes(outputs: Outputs, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per site and strategy: ECE with ema (before) and with the strategy (after), the paired change and its
    interval; rows ``eval_source, strategy, before, after, diff, ci_low, ci_high``."""
    from shiftbn.evaluate import paired_difference
    from shiftbn.evaluate.metrics import metric_value

    rows = []
    for site, y in outputs.labels.items():
        if ("ema", site) not in outputs.outputs:
            continue
        b = outputs.outputs["ema", site]
        for name in outputs.strategies:
            if name == "ema" or (name, site) not in outputs.outputs:
                continue
            a = outputs.outputs[name, site]
            d = paired_difference(a, b, y, "ece", n_boot=n_boot, level=level, seed=seed)
            rows.append({"eval_source": site, "strategy": name, "before": metric_value("ece", b, y),
                         "after": metric_value("ece", a, y), "diff": d.value, "ci_low": d.low, "ci_high": d.high})
    return pd.DataFrame(rows)


def _label_free(model, ds, everything: Outputs, status, trains, shift, calibration, seed, word, run) -> dict:
    """The label-free panel of every site without labels (none: an empty dict); ``run``: the report's
    batch sizes, ``amp`` and ``forward``, which the chooser and the drift monitor run with too."""
    unl = [s for s, v in status.items() if v == "none"]
    if not unl:
        return {}
    full = {s for s in ds.sources_present if (ds.subset(s).labels >= 0).all()}
    labeled = [s for s in trains if s in full]
    candidates = [n for n in everything.strategies]
    validation = validate_chooser(model, ds, labeled, candidates, calibration=calibration, seed=seed, run=run)
    return {site: label_free_panel(model, ds, site, outputs=everything.outputs, strategies=everything.strategies,
                                   labeled=labeled, candidates=candidates, shift=shift, validation=validation,
                                   calibration=calibration, seed=seed, class_names=ds.class_names, word=word,
                                   run=run)
            for site in unl}


def _sites_with_both_parts(ds: SourceTaggedDataset, calibration: float,
                           seed: int) -> tuple[SourceTaggedDataset, dict[str, str]]:
    """``ds`` without the sites whose calibration or evaluation part would be empty, and why each was left out.

    Why: a site of one image (or one image per class) cannot give both statistics and an evaluated
    sample; one such site must not fail the whole report. Each one is named in a warning and in the
    report's header. A site's parts depend only on its class counts (``SourceTaggedDataset.split``).
    """
    if isinstance(calibration, bool) or not isinstance(calibration, (int, float)) or not 0 < calibration < 1:
        return ds, {}  # ``prepare`` refuses it, naming the value
    cal_ds, eval_ds = calibration_split(ds, calibration, False, seed)  # the split ``prepare`` will make
    cal, test = set(cal_ds.sources_present), set(eval_ds.sources_present)
    counts = pd.Series(ds.source_ids).value_counts()
    word = ds.source_word
    skipped = {}
    for site in ds.sources_present:
        if site in cal and site in test:
            continue
        n = int(counts[ds.source_id(site)])
        part = "calibration" if site not in cal else "evaluation"
        skipped[site] = (f"{n} sample(s) leave no {part} sample at calibration fraction {calibration:g}; a {word} "
                         "needs one sample to calibrate and one to evaluate (per class: the split is stratified)")
    if not skipped:
        return ds, {}
    if len(skipped) == len(ds.sources_present):
        raise ValueError(f"no {word} has samples for both calibration and evaluation: {skipped}; add images per "
                         f"{word}")
    for site, why in skipped.items():
        warnings.warn(f"report: {word} {site!r} skipped: {why}", stacklevel=3)
    kept = [s for s in ds.sources_present if s not in skipped]
    return ds.subset(kept), skipped
