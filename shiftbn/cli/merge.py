"""``shiftbn merge``: pool statistics files exactly into one file (no images needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
from shiftbn._log import Phases
from shiftbn.cli._parser import EPILOG


def register(sub) -> None:
    """Add ``merge`` to ``sub`` (the top-level parser's subparsers)."""
    m = sub.add_parser("merge", epilog=EPILOG, help="pool statistics files exactly (no images needed)",
                       description="Pool per-source statistics files (shiftbn stats ... --out NAME.stats) into one "
                                   "file, exactly (Chan's merge in float64). The files must come from one model (same "
                                   "fingerprint) and the same 'stats --mode'; a source name in two files is refused "
                                   "unless --merge-duplicates.")
    m.add_argument("files", nargs="+", type=Path, metavar="FILE", help="statistics files to pool")
    m.add_argument("--out", required=True, type=Path, help="path of the merged statistics file")
    m.add_argument("--pool", action="store_true",
                   help="write only the pooled statistics of all sources (one source named 'pooled'), not each "
                        "source's")
    m.add_argument("--merge-duplicates", action="store_true",
                   help="pool a source found in several files (shards of one source) instead of refusing it")
    user.add_floor_option(m)
    m.add_argument("--force", action="store_true", help="replace --out if it exists (never one of the FILEs)")
    m.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")


def run(args: argparse.Namespace) -> None:
    """``shiftbn merge FILES --out OUT``: merge, write, and list the sources."""
    from shiftbn.bn import SourceStats
    from shiftbn.sites import merge_stats, read_stats_header, save_stats

    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the path of the merged file, e.g. pooled.stats")
    user.check_output(args.out, args.files, args.force, "merge")
    with Phases(2) as phases:
        phases.start(f"reading {len(args.files)} statistics file(s)")
        headers = [read_stats_header(f) for f in args.files]
        merged = merge_stats(*args.files, duplicates="merge" if args.merge_duplicates else "refuse")
        phases.start(f"writing {args.out}")
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
