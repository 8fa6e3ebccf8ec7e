"""``shiftbn monitor``: per-layer drift of sources' data against a reference source; exit 1 on an alert."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
from shiftbn._log import Phases
from shiftbn.cli._parser import DOCS
from shiftbn.cli._renamed import OldFlag
from shiftbn.cli.types import RESAMPLES_MAX, count_type, fraction

EXIT_ALERT = 1
MONITOR_EPILOG = ("Exit status: 0 no alert, 1 at least one scored source alerts (its p-value, adjusted over the "
                  "scored sources by Benjamini-Hochberg, < --alpha), 2 bad input (one line, no traceback). "
                  f"Docs: {DOCS}.")


def register(sub) -> None:
    """Add ``monitor`` to ``sub`` (the top-level parser's subparsers)."""
    p = sub.add_parser("monitor", epilog=MONITOR_EPILOG,
                       help="drift of sources' data against a reference source, per BN layer (exit 1 on an alert)",
                       description="Score each source of --data (all its samples together: a batch or a day) by the "
                                   "per-layer W2 distance of its BN-input statistics (model in eval mode) to a "
                                   "reference source's, with a bootstrap p-value against the reference's own "
                                   "variation at the same sample size; p-values are adjusted over the scored sources "
                                   "(Benjamini-Hochberg) and sources are ranked by the size of their shift. When "
                                   "the reference had labels, ATC's predicted accuracy is printed with its validated "
                                   "error, and not at all for a source whose statistics lie outside the range where "
                                   "it was validated. Fit the reference from a source of --data (--reference, "
                                   "optionally --out FILE) or load a fitted monitor (--stats).")
    user.add_user_options(p)
    user.add_run_options(p)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--stats", type=Path, metavar="FILE",
                     help="a fitted monitor file (written by --out; safetensors, no pickle)")
    ref.add_argument("--reference", metavar="SOURCE", help="fit the monitor on this source of --data")
    p.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                   help="sources of --data to score (default: every source but --reference)")
    p.add_argument("--site", dest="sources", nargs="+", action=OldFlag, new="--sources")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the fitted monitor to this file (with --reference)")
    p.add_argument("--save", dest="out", type=Path, help=argparse.SUPPRESS)  # the first spelling, kept: hidden
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--alpha", type=fraction, default=None,
                   help="alert when a source's p-value, adjusted over the scored sources (Benjamini-Hochberg: the "
                        "expected share of false alarms among the alerts), is below this (default: the monitor's, "
                        "0.05)")
    p.add_argument("--n-null", type=count_type("draw", 20, RESAMPLES_MAX), default=None, metavar="B",
                   help=f"bootstrap draws of the null per sample size, 20 to {RESAMPLES_MAX:,} (default: the "
                        "monitor's, 500)")


def run(args: argparse.Namespace) -> int:
    """Fit or load the monitor, score the sources, print per-layer tables and the ranking; returns the exit status."""
    _check_args(args)
    with Phases(3) as phases:
        phases.start("loading the model and data")
        from shiftbn.sites import DriftMonitor

        forward = user.load_forward(args)
        model, ds = user.load_model(args), user.load_data(args)
        if args.reference is not None:
            user.check_sources([args.reference], ds.sources_present, "--reference")
        if args.sources is not None:
            user.check_sources(args.sources, ds.sources_present, "--sources")
        opts = {k: v for k, v in (("alpha", args.alpha), ("n_null", args.n_null), ("forward", forward))
                if v is not None}
        if args.reference is not None:
            phases.start(f"fitting the monitor on {ds.source_word} {args.reference}")
            ref = _site(ds, args.reference, args)
            monitor = DriftMonitor(model, ref, seed=args.seed, batch_size=args.batch_size, amp=args.amp, **opts)
            if args.out is not None:
                monitor.save(args.out)
                atc = ", with an ATC fit" if monitor.atc is not None else ", no labels: no predicted accuracy"
                print(f"Wrote {args.out}: monitor of {ds.source_word} {args.reference!r} ({monitor.n_reference} "
                      f"samples{atc})")
        else:
            phases.start(f"reading the monitor {args.stats}")
            monitor = DriftMonitor.load(model, args.stats, batch_size=args.batch_size, amp=args.amp, **opts)
        sites = args.sources if args.sources is not None else [s for s in ds.sources_present if s != args.reference]
        if not sites and args.out is None:
            raise ValueError("no source to score: --data holds only the reference source; name sources with --sources")
        if not sites:
            return 0
        _note_resolution(len(sites), monitor)
        phases.start(f"scoring {len(sites)} {ds.source_word}(s): {', '.join(sites)}")
        results = {site: monitor.score(_site(ds, site, args)) for site in _bar(sites, args)}
    return _print_results(results, monitor, ds.source_word, args.reference)


def _bar(sites: list[str], args: argparse.Namespace):
    """``sites``, with a progress bar (rate and time left) on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(sites, desc="sources scored", unit="source", disable=not user.progress(args))


def _note_resolution(m: int, monitor) -> None:
    """Say when --n-null is too coarse for one drifted source among ``m`` to alert after the adjustment."""
    import math
    import sys

    if m / (monitor.n_null + 1) >= monitor.alpha:
        print(f"shiftbn monitor: note: p-values are no smaller than 1/({monitor.n_null}+1); adjusted over {m} "
              f"source(s), one drifted source alone cannot alert at alpha {monitor.alpha:g}: raise --n-null to at "
              f"least {math.ceil(m / monitor.alpha)}", file=sys.stderr)


def _print_results(results: dict, monitor, word: str, reference: str | None) -> int:
    """Per-layer tables in rank order, then the ranking and the alert line; returns the exit status."""
    from shiftbn.sites.atc import OUT_OF_RANGE_ERROR, RANGE_FACTOR
    from shiftbn.sites.drift import CORRECTION, rank_sites

    ranked = rank_sites(results, monitor.alpha)
    ref = f"{word} {reference}" if reference is not None else "the reference"
    for row in ranked.itertuples():
        print(f"\n{word} {row.site} (n={row.n}): effect {row.effect:.3g}, score {row.score:.2f}, "
              f"p = {row.p_value:.4f}, adjusted p = {row.p_adjusted:.4f} -> {'ALERT' if row.alert else 'ok'}")
        print(results[row.site].layers.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = ranked.assign(verdict=ranked["alert"].map({True: "ALERT", False: "ok"}),
                          predicted_accuracy=[_predicted(r) for r in ranked.itertuples()])
    columns = ["rank", "site", "n", "effect", "score", "p_value", "p_adjusted", "verdict", "predicted_accuracy"]
    print(f"\n{word.capitalize()}s ranked (alerts first, then by effect: the distance to {ref} in its standard "
          f"deviations, mean over BN layers); alert: p adjusted over {len(ranked)} {word}(s) by {CORRECTION} < "
          f"{monitor.alpha:g}:")
    print(table[columns].rename(columns={"site": word}).to_string(
        index=False, formatters={"effect": "{:.3g}".format, "score": "{:.2f}".format, "p_value": "{:.4f}".format,
                                 "p_adjusted": "{:.4f}".format}))
    if monitor.atc is None:
        print(f"No predicted accuracy: ATC needs {ref}'s labels and one class prediction per sample (a classifier's "
              "logits, not a segmenter's or a regressor's outputs), and this monitor has no ATC fit; the ranking "
              "above uses BN statistics only.")
    else:
        print(f"predicted accuracy: ATC fitted on {ref}'s labels, ± its validated error (the largest error on labs "
              f"it never saw, inside the range below); none where a {word}'s BN statistics lie more than "
              f"{RANGE_FACTOR:g}x as far from the model's stored ones as {ref}'s (there ATC erred by up to "
              f"{OUT_OF_RANGE_ERROR:.2f}).")
        for r in ranked.itertuples():
            if r.atc_in_range is False and r.range_ratio == r.range_ratio:
                print(f"  {r.site}: no estimate: its statistics lie {r.range_ratio:.3g}x as far from the model's "
                      f"stored ones as {ref}'s.")
            elif r.atc_in_range is False:
                print(f"  {r.site}: no estimate: the model stores no trained running statistics (none, or BN's "
                      "initial mean 0 and variance 1) to check the range against.")
    alerts = list(ranked.loc[ranked["alert"], "site"])
    if alerts:
        print(f"\nALERT: {', '.join(alerts)} drifted from {ref} (adjusted p < {monitor.alpha:g}); "
              "the effect says how far, the predicted accuracy (where given) what it may cost")
        return EXIT_ALERT
    return 0


def _predicted(row) -> str:
    """The predicted-accuracy cell: the estimate with its validated error, or why there is none."""
    if row.atc_in_range is None:
        return "none (no labels)"
    if not row.atc_in_range:
        return "none (out of range)"
    return f"{row.predicted_accuracy:.2f} ± {row.predicted_error:.2f}"


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad options before loading anything (each message names the option)."""
    from shiftbn._io import same_file
    from shiftbn._safefile import is_special

    if args.out is not None and args.reference is None:
        raise ValueError("--out writes a monitor fitted with --reference SOURCE; give --reference")
    if args.out is not None and same_file(args.out, args.weights):
        raise ValueError(f"--out {args.out} is the --weights checkpoint; monitor never overwrites its input: give "
                         "another --out")
    if args.out is not None and args.out.exists() and not args.force:
        raise FileExistsError(f"--out {args.out} exists; pass --force to replace it")
    if args.stats is not None:
        kind = is_special(args.stats)
        if kind is not None:  # a FIFO would block the read forever
            raise ValueError(f"--stats {args.stats} is {kind}, not a regular file; give a monitor file "
                             "(written by --out)")
        if args.stats.is_dir():
            raise ValueError(f"--stats {args.stats} is a folder; give a monitor file (written by --out)")
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
