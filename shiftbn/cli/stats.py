"""``shiftbn stats``: per-source BN statistics of the user's model on the user's data, as tables in a
folder or as one statistics file (``--out NAME.stats``) for ``merge``, ``recalibrate --stats`` and
``matrix --stats``.

Why the file: sites that may not move images compute their statistics where the data lives; only
the files travel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import shiftbn.cli._user as user
import shiftbn.cli.dist as dist
from shiftbn._log import Phases
from shiftbn.cli._parser import EPILOG
from shiftbn.cli._renamed import OldFlag

STATS_SUFFIX = ".stats"


def register(sub) -> None:
    """Add ``stats`` to ``sub`` (the top-level parser's subparsers)."""
    s = sub.add_parser("stats", epilog=EPILOG, help="per-source BN statistics and the layer shift profile",
                       description="Collect exact per-source BN statistics of your model on your data; writes "
                                   "stats.json, stats.csv (tidy) and shift.csv into --out.")
    user.add_user_options(s)
    user.add_run_options(s)
    s.add_argument("--mode", default="batch", choices=["batch", "sequential", "eval"],
                   help="batch: BN normalizes with each batch's own statistics (as in training, PreciseBN); "
                        "sequential: the statistics each layer sees when every earlier layer uses the collected "
                        "ones (inference-consistent); eval: with the model's stored running statistics")
    s.add_argument("--out", type=Path, default=Path("runs/stats"),
                   help="folder for stats.json, stats.csv and shift.csv; a path ending in .stats writes one "
                        "statistics file instead (for merge, recalibrate --stats, matrix --stats)")
    user.add_floor_option(s)
    s.add_argument("--source-name", default=None, metavar="SOURCE",
                   help="with --out NAME.stats: store the statistics under this source name (the data must hold "
                        "one source); merge refuses two files with the same source name")
    s.add_argument("--force", action="store_true",
                   help="with --out NAME.stats: replace the file if it exists (never an input)")
    s.add_argument("--site", dest="source_name", action=OldFlag, new="--source-name")


def run(args: argparse.Namespace) -> None:
    """Collect the statistics; write the tables (or the file) and print the W2 shift per layer and source."""
    from shiftbn._io import atomic_write_text
    from shiftbn.bn import collect_stats, stats_shift
    from shiftbn.evaluate.matrix import check_num_samples
    from shiftbn.sites.files import check_min_count

    check_num_samples(args.num_samples, "--num-samples")  # before the model and data load
    to_file = _writes_file(args)
    if not to_file:
        user.check_out(args.out)
    with Phases(2) as phases:
        phases.start("loading the model and data")
        forward = user.load_forward(args)
        model, ds = user.load_model(args), user.load_data(args)
        phases.start(f"BN statistics of {len(ds.sources_present)} {ds.source_word}(s), {args.mode} mode")
        stats = collect_stats(model, ds, batch_size=args.batch_size, num_samples=args.num_samples, mode=args.mode,
                              seed=args.seed, progress=user.progress(args), amp=args.amp, forward=forward)
    check_min_count(stats, args.min_count, flag="--min-count")  # before anything is written
    if to_file:
        return _write_file(args, model, stats) if dist.writer() else None
    shift = stats_shift(stats, metric="all")
    if dist.writer():
        user.out_folder(args.out)
        user.write_skipped(args, args.out)
        atomic_write_text(args.out / "stats.json", json.dumps(stats.to_dict()))
        atomic_write_text(args.out / "stats.csv", stats.to_frame().to_csv(index=False))
        atomic_write_text(args.out / "shift.csv", shift.to_csv(index=False))
    print(shift[shift["metric"] == "w2"].pivot_table(index="layer", columns="source", values="value", sort=False)
          .round(4).to_string())
    print(f"\nWrote {args.out / 'stats.json'}, stats.csv and shift.csv")


def _writes_file(args) -> bool:
    """Whether ``--out`` names a statistics file (``*.stats``) rather than a folder; checks the options
    that only apply to one of the two."""
    to_file = args.out.suffix == STATS_SUFFIX
    if to_file and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; a statistics file needs a new or file path")
    if args.source_name is not None and not to_file:
        raise ValueError(f"--source-name names the source in a statistics file; give --out NAME{STATS_SUFFIX}")
    if to_file:
        user.check_output(args.out, [args.weights, args.data], args.force, "stats")
    return to_file


def _write_file(args, model, stats) -> None:
    """``--out NAME.stats``: the statistics file, with the collection settings in its header."""
    from shiftbn.sites import save_stats

    extra = {"command": "stats", "mode": args.mode, "batch_size": args.batch_size, "num_samples": args.num_samples,
             "seed": args.seed, "amp": args.amp}
    name = args.source_name
    if name is not None and len(stats) != 1:
        raise ValueError(f"--source-name {name!r} names one source, but --data holds {list(stats)}; give each "
                         "source its own file (a manifest per source) or drop --source-name")
    save_stats(stats, args.out, model=model, min_count=args.min_count, extra=extra, source=name)
    sources = ", ".join(f"{k} ({v.num_samples} samples)" for k, v in stats.sources.items()) if name is None \
        else f"{name} ({next(iter(stats.sources.values())).num_samples} samples)"
    print(f"Wrote {args.out}: BN statistics of {sources}; merge such files with shiftbn merge")
