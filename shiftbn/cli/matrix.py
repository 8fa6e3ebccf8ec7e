"""``shiftbn matrix``: the cross-source evaluation matrix of the user's model, with statistics computed
from ``--data`` or taken from statistics files (``--stats``)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import shiftbn.cli._user as user
import shiftbn.cli.dist as dist
import shiftbn.cli.types as cli_types
from shiftbn._log import Phases
from shiftbn._names import GRAMMAR, METRIC_NAMES
from shiftbn.cli._parser import EPILOG, listing

MATRIX_EPILOG = (f"strategies (--strategies SPEC ...):\n{listing(GRAMMAR.split(' | '), ' | ')}\n"
                 f"metrics (--metrics NAME ...):\n{listing(list(METRIC_NAMES), ', ')}\n\n{EPILOG}\n")


class _Default(list):
    """A default option value, recognizable by type after parsing (a user's value is a plain list)."""


def register(sub) -> None:
    """Add ``matrix`` to ``sub`` (the top-level parser's subparsers)."""
    m = sub.add_parser("matrix", epilog=MATRIX_EPILOG, help="cross-source evaluation matrix of your model",
                       description="Evaluate your model on every source under every strategy; writes matrix.csv.")
    user.add_user_options(m)
    user.add_run_options(m)
    user.add_cache_options(m)
    user.add_eval_batch_option(m)
    # the default list is marked, so --stats can tell it from a user's choice
    m.add_argument("--strategies", nargs="+", default=_Default(["ema", "precise", "target", "stats:*"]),
                   metavar="SPEC", help="strategy specs, grammar below (default: ema precise target stats:*). Cost: "
                                        "one pass over the evaluation samples per strategy (stats:* one per source), "
                                        "except that batch:B, per-batch prior:N and tent are scored over 5 seeded "
                                        "groupings, one pass each (:k=1 for one); a batch:B or prior:N grouping costs "
                                        "about 1.0-1.3x a plain forward (it reads every BN input once more for the "
                                        "batch's statistics), a tent one a backward pass more")
    m.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help="metric names, listed below (default: the task's, read from the labels: accuracy for class "
                        "labels, dice hd95 for masks)")
    user.add_held_out_option(m, "cross_source_matrix(train_sources=[every source not held out])")
    m.add_argument("--unlabeled", nargs="+", default=[], metavar="SOURCE",
                   help="sources whose labels are not used (as sources labeled -1, empty label cells or a folder "
                        "without class folders): they feed statistics and get no metric row; shiftbn report shows "
                        "their label-free panel")
    m.add_argument("--calibration", type=cli_types.fraction, default=None,
                   help="calibration fraction per source (default: 0.5)")
    m.add_argument("--out", type=Path, default=Path("runs/matrix"), help="folder for matrix.csv")
    user.add_ci_options(m, "no intervals (faster)")
    m.add_argument("--stats", nargs="+", type=Path, default=None, metavar="FILE",
                   help="statistics files (shiftbn stats --out NAME.stats, or merge) supplying every source's "
                        "statistics for target, per-source and stats:* (stats:* expands over the files' sources); "
                        "--data is then evaluation data only: all of it is evaluated, no calibration split. "
                        "Strategies that need calibration images (precise, prior:N@n, tent-offline:S) are "
                        "refused; without --strategies it runs ema target stats:*")
    m.add_argument("--merge-duplicates", action="store_true",
                   help="with --stats: pool a source found in several files (shards of one source) instead of "
                        "refusing it (one source exported twice counts twice)")


def run(args: argparse.Namespace) -> None:
    """Compute the matrix, write matrix.csv and print one table per metric."""
    from shiftbn._io import atomic_write_text
    from shiftbn.adapt import StatsFrom, parse_strategy
    from shiftbn.evaluate import cross_source_matrix
    from shiftbn.evaluate.matrix import check_num_samples
    from shiftbn.evaluate.summary import interval_cells

    level = user.ci_level(args)
    user.check_out(args.out)
    check_num_samples(args.num_samples, "--num-samples")  # before the model and data load
    files = _files_stats(args)
    with Phases(2) as phases:
        phases.start("loading the model and data")
        forward = user.load_forward(args)
        model, ds = user.load_model(args), user.load_data(args)
        if args.unlabeled:
            user.check_held_out(args.unlabeled, ds.sources_present, flag="--unlabeled")
            ds = ds.without_labels(args.unlabeled)
        trains = None
        args.metrics = _task_metrics(args.metrics, ds)
        phases.start(f"the cross-source matrix: {len(args.strategies)} strategy spec(s) x "
                     f"{len(ds.sources_present)} {ds.source_word}(s)")
        with user.cached_data(args, ds) as once:
            if files is not None:
                table = _from_files(model, once, files, args, level, forward)
            else:
                trains = user.training_sources(args.held_out, ds.sources_present)
                with warnings.catch_warnings():  # an old spelling's note prints once, when the matrix parses it
                    warnings.simplefilter("ignore", DeprecationWarning)
                    named = [st.source for st in map(parse_strategy, args.strategies) if isinstance(st, StatsFrom)]
                user.check_sources(named, ds.sources_present, "--strategies stats:SOURCE")
                table = cross_source_matrix(model, once, args.strategies, args.metrics, train_sources=trains,
                                            calibration=0.5 if args.calibration is None else args.calibration,
                                            batch_size=args.eval_batch_size, stats_batch_size=args.batch_size,
                                            num_samples=args.num_samples,
                                            seed=args.seed, ci=level, n_boot=args.n_boot,
                                            progress=user.progress(args), amp=args.amp, forward=forward)
    if dist.writer():
        atomic_write_text(user.out_folder(args.out) / "matrix.csv", table.to_csv(index=False))
        user.write_skipped(args, args.out)
    held = set(args.held_out)
    if held:  # the held-out view: marked in the printed columns (matrix.csv keeps the names, as report's does)
        pools = "none (--stats gives no calibration images)" if trains is None else ", ".join(trains)
        print(f"held out (never trained on): {', '.join(dict.fromkeys(args.held_out))}; precise pools the "
              f"calibration data of: {pools}")
    unscored = [s for s in ds.sources_present if s not in set(table["eval_source"])]
    if unscored:
        print(f"no labels, so no metric (their samples still feed statistics): {', '.join(unscored)}; shiftbn report "
              "shows their label-free panel")
    for metric, g in table.groupby("metric", sort=False):
        print(f"\n{metric}{'' if level is None else f' [{level:.0%} interval]'}:")
        g = g.assign(eval_source=[f"{s} [held out]" if s in held else s for s in g["eval_source"]])
        print(interval_cells(g, "strategy", "eval_source").to_string(index=False))
    print(f"\nWrote {args.out / 'matrix.csv'}")


def _task_metrics(metrics, ds) -> list[str]:
    """``--metrics`` checked against the task the labels imply (segmentation: masks), or that task's defaults."""
    from shiftbn.evaluate.matrix import check_metric_classes, misfit_metrics, task_metric_names, task_metrics
    from shiftbn.evaluate.metrics import check_metrics
    from shiftbn.evaluate.task import infer_task

    task = infer_task(ds)
    if metrics is None:
        return task_metrics(None, task)
    try:
        names = check_metrics(metrics)
    except ValueError as e:
        raise ValueError(f"--metrics: {e}") from None
    wrong = misfit_metrics(names, task)
    if wrong:
        raise ValueError(f"--metrics {wrong} do not fit {task} data (read from --data's labels); use one of "
                         f"{task_metric_names(task)}, or leave --metrics out for the task's defaults")
    if task == "segmentation" and ds.class_names is not None:  # else the first batch's channels decide
        check_metric_classes(names, len(ds.class_names), "--metrics")
    return names


def _files_stats(args):
    """``--stats``: the files' statistics, checked before the model and data load (None: no --stats)."""
    if args.stats is None:
        return None
    if args.calibration is not None:
        raise ValueError("--calibration splits --data into calibration and evaluation samples; with --stats the "
                         "statistics come from the files and all of --data is evaluated: drop --calibration")
    user.files_only(args, "matrix")
    if isinstance(args.strategies, _Default):  # precise needs images; the files give every other default
        args.strategies = [s for s in args.strategies if s != "precise"]
    return user.stats_files(args)


def _from_files(model, ds, stats, args, level, forward=None):
    """The cross-source matrix with every source's statistics from the files; ``ds`` is evaluated whole."""
    import numpy as np

    from shiftbn._forward import Runner
    from shiftbn.adapt import AdaptContext, expand_strategies
    from shiftbn.evaluate.matrix import MatrixPlan, case_scorer, score
    from shiftbn.evaluate.metrics import check_metrics
    from shiftbn.evaluate.task import infer_task
    from shiftbn.sites.files import check_model, read_stats_header

    check_model(read_stats_header(args.stats[0]), model, args.stats[0])
    metrics = check_metrics(args.metrics)
    task = infer_task(ds)
    if task != "segmentation":  # masks are read with the images; a segmentation set has no class-label column
        ds.require_labels("evaluation")
    evals = ds.sources_present
    user.training_sources(args.held_out, [*evals, *(s for s in stats if s not in evals)])
    trains = [s for s in stats if s not in set(args.held_out)]
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

    seg = task == "segmentation"  # scored per case as outputs stream; labels are the case positions
    ctx = AdaptContext(model=model, source_stats_fn=lambda: stats, calibration_inputs=no_calibration,
                       eval_inputs=parts.__getitem__, train_sources=trains, eval_sources=evals,
                       batch_size=args.eval_batch_size, seed=args.seed, amp=args.amp, progress=user.progress(args),
                       task=task,
                       runner=Runner(forward=forward, reduce=case_scorer(metrics) if seg else None))
    plan = MatrixPlan(ds, ds, strategies, evals, trains)
    labels = {s: np.arange(len(p)) if seg else p.labels for s, p in parts.items()}
    return score(ctx, plan, labels, metrics, ci=level, n_boot=args.n_boot, progress=user.progress(args))
