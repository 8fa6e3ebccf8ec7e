"""``shiftbn monitor``: per-layer drift of sources' data against a reference source; exit 1 on an alert."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
from shiftbn.cli._parser import DOCS
from shiftbn.cli._renamed import OldFlag
from shiftbn.cli.types import RESAMPLES_MAX, count_type, fraction

EXIT_ALERT = 1
MONITOR_EPILOG = ("Exit status: 0 no alert, 1 at least one scored source alerts (overall p-value < --alpha), 2 bad "
                  f"input (one line, no traceback). Docs: {DOCS}.")


def register(sub) -> None:
    """Add ``monitor`` to ``sub`` (the top-level parser's subparsers)."""
    p = sub.add_parser("monitor", epilog=MONITOR_EPILOG,
                       help="drift of sources' data against a reference source, per BN layer (exit 1 on an alert)",
                       description="Score each source of --data (all its samples together: a batch or a day) by the "
                                   "per-layer W2 distance of its BN-input statistics (model in eval mode) to a "
                                   "reference source's, with a bootstrap p-value against the reference's own "
                                   "variation at the same sample size, and the accuracy drop ATC predicts when the "
                                   "reference had labels. Fit the reference from a source of --data (--reference, "
                                   "optionally --save it) or load a fitted monitor (--stats).")
    user.add_user_options(p)
    user.add_run_options(p)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--stats", type=Path, metavar="FILE",
                     help="a fitted monitor file (written by --save; safetensors, no pickle)")
    ref.add_argument("--reference", metavar="SOURCE", help="fit the monitor on this source of --data")
    p.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                   help="sources of --data to score (default: every source but --reference)")
    p.add_argument("--site", dest="sources", nargs="+", action=OldFlag, new="--sources")
    p.add_argument("--save", type=Path, default=None, metavar="FILE",
                   help="write the fitted monitor (with --reference)")
    p.add_argument("--force", action="store_true", help="replace --save if it exists")
    p.add_argument("--alpha", type=fraction, default=None,
                   help="alert when the overall p-value is below this (default: the monitor's, 0.05)")
    p.add_argument("--n-null", type=count_type("draw", 20, RESAMPLES_MAX), default=None, metavar="B",
                   help=f"bootstrap draws of the null per sample size, 20 to {RESAMPLES_MAX:,} (default: the "
                        "monitor's, 500)")


def run(args: argparse.Namespace) -> int:
    """Fit or load the monitor, score the sources, print per-layer tables; returns the exit status."""
    _check_args(args)
    from shiftbn.sites import DriftMonitor

    forward = user.load_forward(args)
    model, ds = user.load_model(args), user.load_data(args)
    opts = {k: v for k, v in (("alpha", args.alpha), ("n_null", args.n_null), ("forward", forward)) if v is not None}
    if args.reference is not None:
        ref = _site(ds, args.reference, args)
        monitor = DriftMonitor(model, ref, seed=args.seed, batch_size=args.batch_size, amp=args.amp, **opts)
        if args.save is not None:
            monitor.save(args.save)
            print(f"Wrote {args.save}: monitor of {ds.source_word} {args.reference!r} ({monitor.n_reference} samples"
                  f"{', with an ATC fit' if monitor.atc is not None else ', no labels: no predicted accuracy'})")
    else:
        monitor = DriftMonitor.load(model, args.stats, batch_size=args.batch_size, amp=args.amp, **opts)
    sites = args.sources if args.sources is not None else [s for s in ds.sources_present if s != args.reference]
    if not sites and args.save is None:
        raise ValueError("no source to score: --data holds only the reference source; name sources with --sources")
    alerts = []
    for site in sites:
        result = monitor.score(_site(ds, site, args))
        table = result.layers.copy()
        print(f"\n{ds.source_word} {site} (n={result.n}): score {result.score:.2f}, p = {result.p_value:.4f} -> "
              f"{'ALERT' if result.alert else 'ok'} (alpha {monitor.alpha:g})"
              + ("" if result.predicted_drop != result.predicted_drop
                 else f"; predicted accuracy {result.predicted_accuracy:.3f}, drop {result.predicted_drop:+.3f}"))
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if result.alert:
            alerts.append(site)
    if alerts:
        print(f"\nALERT: {', '.join(alerts)} drifted from the reference (p < {monitor.alpha:g})")
        return EXIT_ALERT
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad options before loading anything (each message names the option)."""
    from shiftbn._io import same_file
    from shiftbn._safefile import is_special

    if args.save is not None and args.reference is None:
        raise ValueError("--save writes a monitor fitted with --reference SOURCE; give --reference")
    if args.save is not None and same_file(args.save, args.weights):
        raise ValueError(f"--save {args.save} is the --weights checkpoint; monitor never overwrites its input: give "
                         "another --save")
    if args.save is not None and args.save.exists() and not args.force:
        raise FileExistsError(f"{args.save} exists; pass --force to replace it")
    if args.stats is not None:
        kind = is_special(args.stats)
        if kind is not None:  # a FIFO would block the read forever
            raise ValueError(f"--stats {args.stats} is {kind}, not a regular file; give a monitor file "
                             "(written by --save)")
        if args.stats.is_dir():
            raise ValueError(f"--stats {args.stats} is a folder; give a monitor file (written by --save)")
        if not args.stats.is_file():
            raise FileNotFoundError(f"--stats file not found: {args.stats}")


def _site(ds, name: str, args: argparse.Namespace):
    """The samples of source ``name`` of ``ds`` (at most --num-samples, a seeded subset)."""
    import numpy as np

    part = ds.subset(name)
    if args.num_samples is not None and len(part) > args.num_samples:
        if args.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2 for monitoring, got {args.num_samples}")
        keep = np.sort(np.random.default_rng(args.seed).choice(len(part), args.num_samples, replace=False))
        part = part.take(keep)
    return part
