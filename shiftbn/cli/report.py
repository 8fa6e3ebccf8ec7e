"""``shiftbn report``: the demo's HTML report for the user's model and data (nothing is trained)."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
import shiftbn.cli.types as cli_types
from shiftbn._log import Phases
from shiftbn.cli._parser import EPILOG


def register(sub) -> None:
    """Add ``report`` to ``sub`` (the top-level parser's subparsers)."""
    p = sub.add_parser("report", epilog=EPILOG, help="the demo's HTML report for your model and data",
                       description="Per-source BN statistics and the layer shift profile, the cross-source matrix with "
                                   "bootstrap intervals, paired strategy comparisons, the held-out view, per-source "
                                   "calibration and confusion, and a generated reading, opened by a decision per "
                                   "source (statistics to deploy, why, cost, next command); a source without labels "
                                   "(label -1, empty label cells, a folder without class folders, or --unlabeled) "
                                   "gets a label-free panel instead of label metrics. Writes report.html, "
                                   "report.json, matrix.csv, comparisons.csv, pooled.csv, shift.csv and stats.json "
                                   "into --out. Nothing is trained.")
    user.add_user_options(p)
    user.add_run_options(p)
    user.add_cache_options(p)
    user.add_eval_batch_option(p)
    user.add_held_out_option(p, "build_report(held_out=[...])")
    p.add_argument("--unlabeled", nargs="+", default=[], metavar="SOURCE",
                   help="sources whose labels are not used: no label metric for them, a label-free panel instead "
                        "(same as build_report(unlabeled=[...]))")
    p.add_argument("--strategies", nargs="+", default=["ema", "precise", "target", "prior:16", "stats:*"],
                   help="strategy specs (default: ema precise target prior:16 stats:*); batch:B and per-batch "
                        "prior:N are scored over 5 seeded groupings, one pass over the evaluation samples each "
                        "(:k=1 for one): a batch:B or prior:N grouping costs about 1.0-1.3x a plain forward, "
                        "see shiftbn matrix --help")
    p.add_argument("--calibration", type=cli_types.fraction, default=0.5,
                   help="fraction of each source used unlabeled for statistics; the rest is evaluated")
    user.add_ci_options(p, "no intervals (faster; the reading then claims no difference)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output folder (default: runs/report)")


def run(args: argparse.Namespace) -> None:
    """Build the report into --out and print the accuracy table."""
    from shiftbn.evaluate.matrix import check_num_samples
    from shiftbn.studies.report import build_report

    level = user.ci_level(args)
    user.check_out(args.out)
    check_num_samples(args.num_samples, "--num-samples")  # before the model and data load
    with Phases(2) as phases:
        phases.start("loading the model and data")
        forward = user.load_forward(args)
        model, ds = user.load_model(args), user.load_data(args)
        user.check_held_out(args.held_out, ds.sources_present)  # build_report refuses holding out every source
        if args.unlabeled:
            user.check_held_out(args.unlabeled, ds.sources_present, flag="--unlabeled")
        phases.start(f"the report on {len(ds)} samples of {len(ds.sources_present)} {ds.source_word}(s): "
                     "statistics, matrix, comparisons, figures")
        with user.cached_data(args, ds) as once:
            report = build_report(model, once, user.out_folder(args.out), held_out=args.held_out,
                                  strategies=args.strategies, calibration=args.calibration, ci=level,
                                  n_boot=args.n_boot, batch_size=args.eval_batch_size,
                                  stats_batch_size=args.batch_size, num_samples=args.num_samples,
                                  seed=args.seed, amp=args.amp, progress=user.progress(args),
                                  unlabeled=args.unlabeled, provenance=provenance(args),
                                  command=recalibrate_command(args), forward=forward)
    user.write_skipped(args, args.out)
    import json

    import pandas as pd

    from shiftbn.studies.report import interval_cells

    matrix = pd.read_csv(args.out / "matrix.csv")
    score = "dice" if (matrix["metric"] == "dice").any() else "accuracy"  # segmentation: Dice is the score
    acc = matrix[(matrix["metric"] == score) & ~matrix["is_cross_source"]]
    word = ds.source_word
    summary = json.loads((args.out / "report.json").read_text())
    print(f"Decision per {word}:")
    print("\n".join(summary["decision_lines"]))
    unlabeled = [s for s, v in summary["labels"].items() if v == "none"]
    name = "Dice (mean over cases)" if score == "dice" else "Accuracy"
    print(f"\n{name} by strategy (rows) and {word} (columns){'' if level is None else f', [{level:.0%} interval]'}"
          f"{'' if not unlabeled else '; no labels, so no accuracy: ' + ', '.join(unlabeled)}:")
    if len(acc):
        print(interval_cells(acc, "strategy", "eval_source").to_string(index=False))
    print(f"\nReport: {report}")


def provenance(args: argparse.Namespace) -> dict[str, str]:
    """Model (factory), checkpoint and its sha256, data: what the report's title and report.json name."""
    import hashlib

    digest = hashlib.sha256()
    with open(args.weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"model": args.model, "checkpoint": str(args.weights), "checkpoint_sha256": digest.hexdigest(),
            "data": str(args.data)}


def recalibrate_command(args: argparse.Namespace) -> str:
    """``shiftbn recalibrate`` with this run's model and data options: the start of each next command."""
    import shlex

    parts = ["shiftbn", "recalibrate", "--model", args.model]
    if args.model_kwargs:
        parts += ["--model-kwargs", *args.model_kwargs]
    parts += ["--weights", str(args.weights)]
    for flag, value in (("--state-key", args.state_key), ("--strip-prefix", args.strip_prefix),
                        ("--path-col", None if args.path_col == "path" else args.path_col),
                        ("--label-col", None if args.label_col == "label" else args.label_col),
                        ("--source-col", None if args.source_col == "source" else args.source_col),
                        ("--image-size", args.image_size), ("--channels", args.channels),
                        ("--transform", args.transform), ("--forward", args.forward)):
        if value is not None:
            parts += [flag, str(value)]
    if args.normalize is not None:
        parts += ["--normalize", *(",".join(f"{v:g}" for v in vals) for vals in args.normalize)]
    parts += ["--data", str(args.data)]
    return " ".join(shlex.quote(p) for p in parts)
