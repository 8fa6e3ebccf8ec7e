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
                                   "calibration and confusion, and a generated reading; writes report.html, "
                                   "matrix.csv, comparisons.csv, pooled.csv, shift.csv and stats.json into --out. "
                                   "Nothing is trained.")
    user.add_user_options(p)
    user.add_run_options(p)
    user.add_held_out_option(p, "build_report(held_out=[...])")
    p.add_argument("--strategies", nargs="+", default=["ema", "precise", "target", "prior:16", "stats:*"],
                   help="strategy specs (default: ema precise target prior:16 stats:*)")
    p.add_argument("--calibration", type=cli_types.fraction, default=0.5,
                   help="fraction of each source used unlabeled for statistics; the rest is evaluated")
    user.add_ci_options(p, "no intervals (faster; the reading then claims no difference)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output folder (default: runs/report)")


def run(args: argparse.Namespace) -> None:
    """Build the report into --out and print the accuracy table."""
    from shiftbn.studies.report import build_report

    level = user.ci_level(args)
    user.check_out(args.out)
    with Phases(2) as phases:
        phases.start("loading the model and data")
        model, ds = user.load_model(args), user.load_data(args)
        user.check_held_out(args.held_out, ds.sources_present)  # build_report refuses holding out every source
        phases.start(f"the report on {len(ds)} samples of {len(ds.sources_present)} {ds.source_word}(s): "
                     "statistics, matrix, comparisons, figures")
        report = build_report(model, ds, user.out_folder(args.out), held_out=args.held_out,
                              strategies=args.strategies, calibration=args.calibration, ci=level, n_boot=args.n_boot,
                              stats_batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed,
                              amp=args.amp, progress=user.progress(args))
    user.write_skipped(args, args.out)
    import pandas as pd

    from shiftbn.studies.report import interval_cells

    matrix = pd.read_csv(args.out / "matrix.csv")
    acc = matrix[(matrix["metric"] == "accuracy") & ~matrix["is_cross_source"]]
    word = ds.source_word
    print(f"Accuracy by strategy (rows) and {word} (columns){'' if level is None else f', [{level:.0%} interval]'}:")
    print(interval_cells(acc, "strategy", "eval_source").to_string(index=False))
    print(f"\nReport: {report}")
