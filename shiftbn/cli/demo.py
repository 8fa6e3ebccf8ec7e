"""``shiftbn demo``: the built-in multi-lab demo, trained and reported in one run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
import shiftbn.cli.types as cli_types
from shiftbn.cli._parser import EPILOG

# README's "Your model": the same report for one's own network, checkpoint and images
NEXT_COMMAND = "shiftbn report --model mypkg.nets:make --weights ckpt.pt --data images/ --out runs/mine"


def register(sub) -> None:
    """Add ``demo`` to ``sub`` (the top-level parser's subparsers)."""
    d = sub.add_parser("demo", epilog=EPILOG, help="run the built-in multi-lab demo and write an HTML report",
                       description="Train a small BN network on a built-in multi-lab dataset (one lab held out), "
                                   "compute per-lab statistics and the layer shift profile, the cross-source "
                                   "matrix, EMA vs PreciseBN and the decision panels, and write report.html "
                                   "(--held-out-protocol adds one retrained model per lab).")
    d.add_argument("--dataset", default="digits-labs",
                   choices=["digits-labs", "fashion-mnist-labs", "digits-c", "fashion-mnist-c"],
                   help="built-in multi-lab dataset")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="a small run in seconds (for a first look and tests)")
    d.add_argument("--held-out-protocol", action="store_true",
                   help="also retrain one model without each lab and measure it there (the report's held-out "
                        "bars); most of a full run's time, so only when asked")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--seed", type=cli_types.seed, default=0,
                   help="seed of the data split, the model's initialization and training, and every random batch")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    user.add_run_options(d)


def run(args: argparse.Namespace) -> None:
    """Train, measure and report; print the accuracy table and the summary."""
    from shiftbn.studies.demo import run_demo

    result = run_demo(args.out, dataset=args.dataset, quick=args.quick, resume=args.resume, seed=args.seed,
                      progress=user.progress(args), held_out_protocol=args.held_out_protocol)
    from shiftbn.studies.report import interval_cells

    acc = result.matrix.query("metric == 'accuracy' and not is_cross_source")
    level = " [95% interval]" if "ci_low" in acc.columns else ""
    print(f"\nAccuracy by strategy (rows) and lab (columns){level}:")
    print(interval_cells(acc, "strategy", "eval_source").to_string(index=False))
    s = result.summary.query("metric == 'accuracy'")[["strategy", "mean", "worst_source", "worst", "gap"]]
    print("\nSummary over labs:")
    print(s.round(3).to_string(index=False))
    print(f"\nReport: {result.report}")
    print(f"Next, your own model: {NEXT_COMMAND}")
