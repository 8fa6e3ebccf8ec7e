"""Statistics files on the command line: ``stats --out NAME.stats``, ``merge``, ``recalibrate --stats``,
``matrix --stats``.

Why: sites that may not move images compute their statistics where the data lives; only the files
travel, and every command that needs statistics can take them from the files instead of images.
Torch-free at import (``shiftbn --help`` stays fast); the handlers import what they need.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shiftbn.cli._renamed import OldFlag
from shiftbn.cli.types import count_type

STATS_SUFFIX = ".stats"
_FLOOR_HELP = ("refuse to write statistics of any source built from fewer samples (a privacy floor against "
               "exporting the moments of a handful of patients; NOT differential privacy)")


class _Default(list):
    """A default option value, recognizable by type after parsing (a user's value is a plain list)."""


_min_count = count_type("sample")


def register(sub, *, stats: argparse.ArgumentParser, matrix: argparse.ArgumentParser,
             recalibrate: argparse.ArgumentParser, epilog: str) -> None:
    """Add ``merge`` and the statistics-file options of ``stats``, ``matrix`` and ``recalibrate``."""
    stats.add_argument("--min-count", type=_min_count, default=None, metavar="N", help=_FLOOR_HELP)
    stats.add_argument("--source-name", default=None, metavar="SOURCE",
                       help="with --out NAME.stats: store the statistics under this source name (the data must hold "
                            "one source); merge refuses two files with the same source name")
    stats.add_argument("--force", action="store_true",
                       help="with --out NAME.stats: replace the file if it exists (never an input)")
    stats.add_argument("--site", dest="source_name", action=OldFlag, new="--source-name")
    for action in stats._actions:
        if "--out" in action.option_strings:
            action.help = ("folder for stats.json, stats.csv and shift.csv; a path ending in .stats writes one "
                           "statistics file instead (for merge, recalibrate --stats, matrix --stats)")
    matrix.add_argument("--stats", nargs="+", type=Path, default=None, metavar="FILE",
                        help="statistics files (shiftbn stats --out NAME.stats, or merge) supplying every source's "
                             "statistics for target, per-source and stats:* (stats:* expands over the files' sources); "
                             "--data is then evaluation data only: all of it is evaluated, no calibration split. "
                             "Strategies that need calibration images (precise, prior:N@n, tent-offline:S) are "
                             "refused; the default strategies become ema target stats:*")
    for action in matrix._actions:  # mark the default list, so --stats can tell it from a user's choice
        if "--strategies" in action.option_strings:
            action.default = _Default(action.default)
    recalibrate.add_argument("--stats", nargs="+", type=Path, default=None, metavar="FILE",
                             help="take the statistics from these files instead of --data (no images needed): the "
                                  "source named by --target, the only source of the files, or all pooled (--pool)")
    recalibrate.add_argument("--pool", action="store_true",
                             help="with --stats: the exact pooled statistics of every source in the files")
    for p in (matrix, recalibrate):
        p.add_argument("--merge-duplicates", action="store_true",
                       help="with --stats: pool a source found in several files (shards of one source) instead of "
                            "refusing it (one source exported twice counts twice)")
    for action in recalibrate._actions:  # --stats replaces --data here; the handler requires one of them
        if "--data" in action.option_strings:
            action.required = False
            action.help += " (or --stats)"
    m = sub.add_parser("merge", epilog=epilog, help="pool statistics files exactly (no images needed)",
                       description="Pool per-source statistics files (shiftbn stats ... --out NAME.stats) into one "
                                   "file, "
                                   "exactly (Chan's merge in float64). The files must come from one model (same "
                                   "fingerprint) and the same 'stats --mode'; a source name in two files is refused "
                                   "unless --merge-duplicates.")
    m.add_argument("files", nargs="+", type=Path, metavar="FILE", help="statistics files to pool")
    m.add_argument("--out", required=True, type=Path, help="path of the merged statistics file")
    m.add_argument("--pool", action="store_true",
                   help="write only the pooled statistics of all sources (one source named 'pooled'), not each "
                        "source's")
    m.add_argument("--merge-duplicates", action="store_true",
                   help="pool a source found in several files (shards of one source) instead of refusing it")
    m.add_argument("--min-count", type=_min_count, default=None, metavar="N", help=_FLOOR_HELP)
    m.add_argument("--force", action="store_true", help="replace --out if it exists (never one of the FILEs)")
    m.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")


def writes_file(args) -> bool:
    """Whether ``stats --out`` names a statistics file (``*.stats``) rather than a folder; checks the
    options that only apply to one of the two."""
    to_file = args.out.suffix == STATS_SUFFIX
    if to_file and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; a statistics file needs a new or file path")
    if args.source_name is not None and not to_file:
        raise ValueError(f"--source-name names the source in a statistics file; give --out NAME{STATS_SUFFIX}")
    if to_file:
        inputs = [p for p in (getattr(args, "weights", None), getattr(args, "data", None)) if p is not None]
        check_output(args.out, inputs, args.force, "stats")
    return to_file


def check_output(out: Path, inputs, force: bool, verb: str) -> None:
    """Refuse ``--out`` when it is one of ``inputs`` (also through another path, a symlink or a hard
    link) and, unless ``force``, when it exists: a file is never replaced without asking."""
    from shiftbn._io import same_file

    for p in inputs:
        if same_file(out, Path(p)):
            raise ValueError(f"--out {out} is the input {p}; {verb} never overwrites its input: give another --out")
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it, or give another --out")


def check_floor(args, stats) -> None:
    """``--min-count``: refuse (before anything is written) when a source has fewer samples."""
    from shiftbn.sites.files import check_min_count

    check_min_count(stats, args.min_count, flag="--min-count")


def write_site(args, model, stats) -> None:
    """``stats --out NAME.stats``: the statistics file, with the collection settings in its header."""
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


def cmd_merge(args) -> None:
    """``shiftbn merge FILES --out OUT``."""
    from shiftbn.bn import SourceStats
    from shiftbn.sites import merge_stats, read_stats_header, save_stats

    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the path of the merged file, e.g. pooled.stats")
    check_output(args.out, args.files, args.force, "merge")
    headers = [read_stats_header(f) for f in args.files]
    merged = merge_stats(*args.files, duplicates="merge" if args.merge_duplicates else "refuse")
    if args.pool:
        merged = SourceStats({"pooled": merged.pooled()}, merged.mode, merged.passes)
    sources = [{"file": Path(f).name, "sources": h.sources} for f, h in zip(args.files, headers, strict=True)]
    extra = {"command": "merge", "pooled": bool(args.pool), "merged_from": sources}
    save_stats(merged, args.out, model=headers[0].fingerprint, min_count=args.min_count, extra=extra)
    if not args.quiet:
        for name, bn in merged.sources.items():
            print(f"  {name}: {bn.num_samples} samples")
        total = sum(bn.num_samples for bn in merged.sources.values())
        print(f"Wrote {args.out}: {len(merged)} source(s), {total} samples from {len(args.files)} file(s)")


def _files_only(args, verb: str) -> None:
    """Refuse options that choose images for statistics when the statistics come from files."""
    if args.num_samples is not None:
        raise ValueError(f"--num-samples caps the samples statistics are computed from; with --stats {verb} takes "
                         "them from the files: drop --num-samples (cap where the files are written: shiftbn stats "
                         "--num-samples)")


def _merged(args):
    from shiftbn.sites import merge_stats

    return merge_stats(*args.stats, duplicates="merge" if args.merge_duplicates else "refuse")


def recalibrate_from_files(args, load_model) -> None:
    """``recalibrate --stats FILE...``: load one source's (or the pooled) statistics into a new checkpoint."""
    from shiftbn._io import atomic_save_torch
    from shiftbn.bn import bn_layers, load_stats
    from shiftbn.sites.files import check_model, read_stats_header

    if args.data is not None:
        raise ValueError("--stats replaces --data for recalibrate; give one of them")
    _files_only(args, "recalibrate")
    if args.method == "precise":
        raise ValueError("--method precise runs PreciseBN in random batches that mix the sources, which needs the "
                         "images (--data); with --stats use --pool (the exact pooled statistics of every source, "
                         "each seen in its own batches) or --target NAME")
    if args.pool and args.target is not None:
        raise ValueError("--pool pools every source, --target takes one; give one of them")
    stats = _merged(args)
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
    model = load_model(args)
    check_model(read_stats_header(args.stats[0]), model, args.stats[0])
    load_stats(model, bn)
    atomic_save_torch(args.output, model.state_dict())
    print(f"Wrote {args.output}: BN statistics from {bn.num_samples} samples of {where} (from {len(args.stats)} "
          "statistics file(s))")
    kept = [layer.name for layer in bn_layers(model) if layer.name not in bn.layers]
    if kept:  # layers never called while the sites collected: nothing to load, said rather than silent
        print(f"Kept the stored statistics of BN layer(s) {kept[:8]}{' ...' if len(kept) > 8 else ''}: the files "
              "hold none for them (never called while the statistics were collected)")


def matrix_stats(args):
    """``matrix --stats``: the files' statistics, checked before the model and data load (None: no --stats)."""
    if args.stats is None:
        return None
    if args.calibration is not None:
        raise ValueError("--calibration splits --data into calibration and evaluation samples; with --stats the "
                         "statistics come from the files and all of --data is evaluated: drop --calibration")
    _files_only(args, "matrix")
    if isinstance(args.strategies, _Default):  # precise needs images; the files give every other default
        args.strategies = [s for s in args.strategies if s != "precise"]
    return _merged(args)


def matrix_from_files(model, ds, stats, args, level):
    """The cross-source matrix with every source's statistics from the files; ``ds`` is evaluated whole."""
    from shiftbn.adapt import AdaptContext, expand_strategies
    from shiftbn.cli.main import _progress
    from shiftbn.evaluate.matrix import MatrixPlan, score
    from shiftbn.evaluate.metrics import check_metrics
    from shiftbn.sites.files import check_model, read_stats_header

    check_model(read_stats_header(args.stats[0]), model, args.stats[0])
    metrics = check_metrics(args.metrics)
    ds.require_labels("evaluation")
    evals = ds.sources_present
    strategies = expand_strategies(args.strategies, list(stats))
    for st in strategies:
        if st.needs_precise or any(st.calibration_sources(j) for j in evals):
            raise ValueError(f"strategy {st.name!r} needs calibration images, which --stats does not provide (the "
                             "files hold statistics only); drop it, or run matrix with --data alone")
        missing = sorted({s for j in evals for s in st.stats_sources(j) if s not in stats})
        if missing:
            raise ValueError(f"strategy {st.name!r} needs statistics of source(s) {missing}, which the --stats files "
                             f"do not hold (they hold {list(stats)}); add those sources' files or drop the strategy")
    parts = {s: ds.subset(s) for s in evals}

    def no_calibration(source):
        raise ValueError("with --stats there are no calibration images")

    ctx = AdaptContext(model=model, source_stats_fn=lambda: stats, calibration_inputs=no_calibration,
                       eval_inputs=parts.__getitem__, train_sources=list(stats), eval_sources=evals,
                       seed=args.seed, amp=args.amp, progress=_progress(args))
    plan = MatrixPlan(ds, ds, strategies, evals, list(stats))
    return score(ctx, plan, {s: p.labels for s, p in parts.items()}, metrics, ci=level, n_boot=args.n_boot,
                 progress=_progress(args))
