"""``shiftbn run``: a study spec (TOML) run cell by cell into a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import shiftbn.cli._user as user
import shiftbn.cli.dist as dist
from shiftbn.cli._parser import EPILOG


def register(sub) -> None:
    """Add ``run`` to ``sub`` (the top-level parser's subparsers)."""
    r = sub.add_parser("run", epilog=EPILOG, help="run a study spec from analyses/ (TOML)",
                       description="Run a study spec cell by cell into a run folder; --resume skips finished cells.")
    r.add_argument("spec", type=Path, help="study spec, e.g. analyses/held_out.toml")
    r.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<spec name>)")
    r.add_argument("--quick", action="store_true", help="use the spec's [quick] settings")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    user.add_run_options(r)


def run(args: argparse.Namespace) -> None:
    """Run the spec's cells (spread over the ranks under torchrun; rank 0 holds the folder)."""
    from shiftbn.studies import load_spec
    from shiftbn.studies.runner import run_study
    from shiftbn.studies.runs import RunFolder

    if args.spec.is_dir():
        raise ValueError(f"spec {args.spec} is a folder; give a study spec file, e.g. analyses/held_out.toml")
    spec = load_spec(args.spec)
    out = args.out or Path("runs") / spec.name
    config = {"spec": str(args.spec), "protocol": spec.protocol, "dataset": spec.dataset, "sources": spec.sources,
              "quick": args.quick, "params": spec.resolved(args.quick)}
    from shiftbn.bn.distributed import RankSync

    folder = RankSync().check(lambda: RunFolder(out, config, resume=args.resume) if dist.writer() else None)
    try:  # under torchrun rank 0 alone holds the folder; the cells are spread over the ranks
        table = run_study(spec, folder, quick=args.quick, progress=user.progress(args))
    finally:
        if folder is not None:
            folder.close()
    print(f"{len(table)} result rows in {out / 'results.csv'}")
