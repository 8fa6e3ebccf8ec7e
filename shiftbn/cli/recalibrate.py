"""``shiftbn recalibrate``: a NEW checkpoint with BN statistics for a target source, computed from images
(``--data``) or taken from statistics files (``--stats``); the input checkpoint is never overwritten."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
import shiftbn.cli.dist as dist
from shiftbn._log import Phases
from shiftbn.cli._parser import EPILOG


def register(sub) -> None:
    """Add ``recalibrate`` to ``sub`` (the top-level parser's subparsers)."""
    c = sub.add_parser("recalibrate", epilog=EPILOG, help="write a checkpoint with BN statistics for a target source",
                       description="Recompute BN statistics (target: AdaBN on the target source's unlabeled data; "
                                   "precise: PreciseBN over all data, or the target source's) and write them into a "
                                   "NEW checkpoint; the input checkpoint is never overwritten. Same as "
                                   "shiftbn.recalibrate(model, data, target=..., method=...).")
    user.add_user_options(c, data_or="--stats")  # --stats replaces --data here; run() requires one of them
    user.add_run_options(c)
    c.add_argument("--target", default=None, metavar="SOURCE", help="target source name (required for --method target)")
    c.add_argument("--method", default="target", choices=["target", "precise"],
                   help="target: the source's own statistics (AdaBN); precise: PreciseBN in random batches over "
                        "all data, or over --target's when given (default: target)")
    c.add_argument("--out", type=Path, default=None, metavar="FILE", help="path of the new checkpoint (required)")
    c.add_argument("--output", dest="out", type=Path, help=argparse.SUPPRESS)  # the first spelling, kept: hidden
    c.add_argument("--force", action="store_true", help="replace --out if it exists (never the input)")
    c.add_argument("--stats", nargs="+", type=Path, default=None, metavar="FILE",
                   help="take the statistics from these files instead of --data (no images needed): the "
                        "source named by --target, the only source of the files, or all pooled (--pool)")
    c.add_argument("--pool", action="store_true",
                   help="with --stats: the exact pooled statistics of every source in the files")
    c.add_argument("--merge-duplicates", action="store_true",
                   help="with --stats: pool a source found in several files (shards of one source) instead of "
                        "refusing it (one source exported twice counts twice)")


def run(args: argparse.Namespace) -> None:
    """Recompute (or load) the statistics and write the new checkpoint."""
    from shiftbn._io import atomic_save_torch
    from shiftbn.evaluate.matrix import check_num_samples
    from shiftbn.sites import recalibrate

    check_num_samples(args.num_samples, "--num-samples")  # before the model and data load
    if args.out is None:
        raise ValueError("recalibrate writes a new checkpoint: give its path with --out FILE")
    user.check_output(args.out, [args.weights], args.force, "recalibrate")
    if args.stats is not None:
        return _from_files(args)
    if args.data is None:
        raise ValueError("recalibrate needs --data (images) or --stats (statistics files)")
    with Phases(2) as phases:
        phases.start("loading the model and data")
        forward = user.load_forward(args)
        model, ds = user.load_model(args), user.load_data(args)
        if args.target is not None:
            user.check_sources([args.target], ds.sources_present, "--target")
        elif args.method == "target":
            raise ValueError(f"--method target (the default) recomputes one source's statistics: name it with "
                             f"--target SOURCE, one of {', '.join(map(str, ds.sources_present))} (or --method precise "
                             "for all data)")
        where = f"{ds.source_word} {args.target!r}" if args.target else "all data"
        phases.start(f"BN statistics of {where} ({args.method})")
        stats = recalibrate(model, ds, target=args.target, method=args.method, batch_size=args.batch_size,
                            num_samples=args.num_samples, seed=args.seed, progress=user.progress(args), amp=args.amp,
                            forward=forward)
        if dist.writer():
            atomic_save_torch(args.out, model.state_dict())
    print(f"Wrote {args.out}: BN statistics from {stats.num_samples} samples of {where} ({args.method})")


def _from_files(args) -> None:
    """``--stats FILE...``: load one source's (or the pooled) statistics into a new checkpoint."""
    from shiftbn._io import atomic_save_torch
    from shiftbn.bn import bn_layers, load_stats
    from shiftbn.sites.files import check_model, read_stats_header

    if args.data is not None:
        raise ValueError("--stats replaces --data for recalibrate; give one of them")
    user.files_only(args, "recalibrate")
    if args.forward is not None:
        raise ValueError("--forward runs the model on --data; with --stats the statistics come from the files and the "
                         "model is not run: drop --forward")
    if args.method == "precise":
        raise ValueError("--method precise runs PreciseBN in random batches that mix the sources, which needs the "
                         "images (--data); with --stats use --pool (the exact pooled statistics of every source, "
                         "each seen in its own batches) or --target NAME")
    if args.pool and args.target is not None:
        raise ValueError("--pool pools every source, --target takes one; give one of them")
    stats = user.stats_files(args)
    if args.pool:
        bn, where = stats.pooled(), f"{len(stats)} source(s) pooled"
    elif args.target is not None:
        bn, where = stats[args.target], f"source {args.target!r}"
    elif len(stats) == 1:
        (name, bn), = stats.sources.items()
        where = f"source {name!r}"
    else:
        raise ValueError(f"the --stats files hold {len(stats)} sources {list(stats)}; choose one with --target NAME "
                         "or pool them all with --pool")
    model = user.load_model(args)
    check_model(read_stats_header(args.stats[0]), model, args.stats[0])
    load_stats(model, bn)
    atomic_save_torch(args.out, model.state_dict())
    print(f"Wrote {args.out}: BN statistics from {bn.num_samples} samples of {where} (from {len(args.stats)} "
          "statistics file(s))")
    kept = [layer.name for layer in bn_layers(model) if layer.name not in bn.layers]
    if kept:  # layers never called while the sites collected: nothing to load, said rather than silent
        print(f"Kept the stored statistics of BN layer(s) {kept[:8]}{' ...' if len(kept) > 8 else ''}: the files "
              "hold none for them (never called while the statistics were collected)")
