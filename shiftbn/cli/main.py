"""The ``shiftbn`` command line: demo, run, stats, matrix, recalibrate, report, monitor."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import shiftbn._log as _log
import shiftbn.cli.dist as _dist
import shiftbn.cli.files as cli_files
import shiftbn.cli.types as cli_types
from shiftbn._names import GRAMMAR, METRIC_NAMES
from shiftbn._version import __version__
from shiftbn.cli._renamed import old_spelling_notes
from shiftbn.cli.monitor import cmd_monitor
from shiftbn.cli.monitor import register as _register_monitor

# Only the standard library and torch-free shiftbn modules above: ``--help`` and argument errors
# answer before torch is imported (the commands import what they need).

EPILOG = "Errors print one line and exit with status 2. Docs: README.md (CLI reference)."


def _listing(items: list[str], sep: str, width: int = 76) -> str:
    """``items`` joined by ``sep`` into indented lines of at most ``width`` characters, never split inside one."""
    lines, line = [], ""
    for item in items:
        piece = item if not line else line + sep + item
        if line and len(piece) > width - 2:
            lines.append(line + sep.rstrip())
            line = item
        else:
            line = piece
    return "\n".join("  " + x for x in [*lines, line])


MATRIX_EPILOG = (f"strategies (--strategies SPEC ...):\n{_listing(GRAMMAR.split(' | '), ' | ')}\n"
                 f"metrics (--metrics NAME ...):\n{_listing(list(METRIC_NAMES), ', ')}\n\n{EPILOG}\n")


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the text already names it); a description
    or epilog with line breaks keeps them (the strategy grammar), others are wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or "default" in text or default is argparse.SUPPRESS
                or isinstance(default, bool) or action.nargs == 0):
            return text
        if default is None:
            shown = "none"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) or "none"
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults and whose errors are one line (no usage block);
    sub-commands get the same class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_SEED_HELP = "seed of every random choice: subsets, random batches, calibration splits"


def _user_model_command(p: argparse.ArgumentParser) -> None:
    """The options of stats, matrix and recalibrate: the user's model and data, then the run options."""
    _add_user_model_args(p)
    for action in p._actions:  # --seed is declared with the model options; give it a help text if it has none
        if "--seed" in action.option_strings and not action.help:
            action.help = _SEED_HELP
    _add_run_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options of every command that computes: threads, quiet, progress bars."""
    p.add_argument("--threads", type=cli_types.threads, default=None, metavar="N",
                   help="torch threads for this run, set before any work and recorded in environment.json; "
                        "numbers can differ in the last digits between thread counts, and a --resume under "
                        "another count is refused (default: torch's own: the physical cores, or "
                        "$OMP_NUM_THREADS; running P processes side by side, give each cores/P)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no phase lines and no progress bars on stderr (results and errors still print)")


def _add_user_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="import path of a function that returns the model, e.g. mypkg.nets:make_resnet (the working "
                        "folder is searched last, only for this module), or a library's model: timm:resnet50d, "
                        "torchvision:resnet18, monai:DenseNet121 (built without pretrained weights)")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="keyword arguments for the factory, e.g. num_classes=2 pretrained=false or "
                        "spatial_dims=2,in_channels=3 (values: numbers, true/false, null, tuples such as 16,32 or "
                        "(16,32); anything else is a string)")
    p.add_argument("--weights", required=True, type=Path,
                   help="state dict saved with torch.save(model.state_dict()); loaded with weights_only=True")
    p.add_argument("--state-key", default=None, metavar="KEY",
                   help="take the state dict from this key of the checkpoint (Lightning: state_dict)")
    p.add_argument("--strip-prefix", default=None, metavar="PREFIX",
                   help="remove this prefix from the state dict's keys (Lightning: model.)")
    p.add_argument("--device", default="cpu", type=cli_types.device,
                   help="device for the model and inputs: cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--amp", action="store_true", help="run forwards under autocast (mixed precision); BN statistics "
                                                     "stay exact in float64")
    p.add_argument("--data", required=True, type=Path,
                   help="manifest CSV/Parquet (columns path,label,source) or an image folder root/<source>/<class>/; "
                        "pixels are mapped to [0, 1]: 8-bit files / 255, 16-bit grayscale / 65535, 32-bit float as "
                        "stored (refused outside [0, 1]), 32-bit integer refused")
    p.add_argument("--path-col", default="path", help="manifest column with image paths (default: path)")
    p.add_argument("--label-col", default="label",
                   help="manifest column with labels (default: label; 'none' for unlabeled data)")
    p.add_argument("--source-col", default="source",
                   help="manifest column with the source; its name is the report's word for a source, e.g. "
                        "hospital (default: source)")
    p.add_argument("--image-size", type=cli_types.image_size, default=None, metavar="SIZE",
                   help=f"resize images to SIZE x SIZE before the model (1 to {cli_types.IMAGE_SIZE_MAX})")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="convert every image to 1 (grayscale) or 3 (RGB) channels (default: as stored)")
    p.add_argument("--normalize", nargs=2, type=cli_types.numbers, action=cli_types.Normalize, default=None,
                   metavar=("MEAN", "STD"),
                   help="normalize as (x - MEAN) / STD after scaling to [0, 1]; one number or one per channel, "
                        "comma-separated (ImageNet: 0.485,0.456,0.406 0.229,0.224,0.225)")
    p.add_argument("--strict", action="store_true",
                   help="refuse unreadable image files instead of skipping them (skipped files are listed in "
                        "skipped.csv in the output folder)")
    p.add_argument("--allow-outside", action="store_true",
                   help="let manifest paths point outside the manifest's folder (refused by default)")
    p.add_argument("--batch-size", type=cli_types.count_type("sample"), default=64,
                   help="batch size for statistics (default: 64)")
    p.add_argument("--num-samples", type=cli_types.count_type("sample"), default=None,
                   help="at most this many samples per source")
    p.add_argument("--seed", type=cli_types.seed, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="shiftbn", epilog=EPILOG,
                                 description="How BatchNorm networks trained on several sources behave under domain "
                                             "shift, and BN recalibration that fixes what can be fixed.")
    ap.add_argument("--version", action="version", version=f"shiftbn {__version__}")
    _dist.add_args(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")  # bare `shiftbn` prints this help (main)

    d = sub.add_parser("demo", epilog=EPILOG, help="run the built-in multi-lab demo and write an HTML report",
                       description="Train a small BN network on a built-in multi-lab dataset (one lab held out), "
                                   "compute per-lab statistics and the layer shift profile, the cross-source "
                                   "matrix, the held-out-lab protocol and EMA vs PreciseBN, and write report.html.")
    d.add_argument("--dataset", default="digits-labs",
                   choices=["digits-labs", "fashion-mnist-labs", "digits-c", "fashion-mnist-c"],
                   help="built-in multi-lab dataset")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="a small run in seconds (for a first look and tests)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--seed", type=cli_types.seed, default=0,
                   help="seed of the data split, the model's initialization and training, and every random batch")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_run_args(d)

    r = sub.add_parser("run", epilog=EPILOG, help="run a study spec from analyses/ (TOML)",
                       description="Run a study spec cell by cell into a run folder; --resume skips finished cells.")
    r.add_argument("spec", type=Path, help="study spec, e.g. analyses/held_out.toml")
    r.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<spec name>)")
    r.add_argument("--quick", action="store_true", help="use the spec's [quick] settings")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_run_args(r)

    s = sub.add_parser("stats", epilog=EPILOG, help="per-source BN statistics and the layer shift profile",
                       description="Collect exact per-source BN statistics of your model on your data; writes "
                                   "stats.json, stats.csv (tidy) and shift.csv into --out.")
    _user_model_command(s)
    s.add_argument("--mode", default="batch", choices=["batch", "sequential", "eval"],
                   help="batch: BN normalizes with each batch's own statistics (as in training, PreciseBN); "
                        "sequential: the statistics each layer sees when every earlier layer uses the collected "
                        "ones (inference-consistent); eval: with the model's stored running statistics")
    s.add_argument("--out", type=Path, default=Path("runs/stats"),
                   help="folder for stats.json, stats.csv and shift.csv")

    m = sub.add_parser("matrix", epilog=MATRIX_EPILOG, help="cross-source evaluation matrix of your model",
                       description="Evaluate your model on every source under every strategy; writes matrix.csv.")
    _user_model_command(m)
    m.add_argument("--strategies", nargs="+", default=["ema", "precise", "target", "stats:*"],
                   metavar="SPEC", help="strategy specs, grammar below (default: ema precise target stats:*)")
    m.add_argument("--metrics", nargs="+", default=["accuracy"], metavar="NAME",
                   help="metric names, listed below (default: accuracy)")
    m.add_argument("--calibration", type=cli_types.fraction, default=None,
                   help="calibration fraction per source (default: 0.5)")
    m.add_argument("--out", type=Path, default=Path("runs/matrix"), help="folder for matrix.csv")
    _add_ci_args(m, "no intervals (faster)")

    c = sub.add_parser("recalibrate", epilog=EPILOG, help="write a checkpoint with BN statistics for a target source",
                       description="Recompute BN statistics (target: AdaBN on the target source's unlabeled data; "
                                   "precise: PreciseBN over all data, or the target source's) and write them into a "
                                   "NEW checkpoint; the input checkpoint is never overwritten. Same as "
                                   "shiftbn.recalibrate(model, data, target=..., method=...).")
    _user_model_command(c)
    c.add_argument("--target", default=None, metavar="SOURCE", help="target source name (required for --method target)")
    c.add_argument("--method", default="target", choices=["target", "precise"],
                   help="target: the source's own statistics (AdaBN); precise: PreciseBN in random batches over "
                        "all data, or over --target's when given (default: target)")
    c.add_argument("--output", required=True, type=Path, help="path of the new checkpoint")
    c.add_argument("--force", action="store_true", help="replace --output if it exists (never the input)")
    cli_files.register(sub, stats=s, matrix=m, recalibrate=c, epilog=EPILOG)
    _add_report_parser(sub)
    _register_monitor(sub)
    return ap


def _add_ci_args(p: argparse.ArgumentParser, no_ci_help: str) -> None:
    """--ci, --no-ci and --n-boot, shared by the commands that print intervals."""
    p.add_argument("--ci", type=cli_types.fraction, default=0.95, metavar="LEVEL",
                   help="bootstrap interval level of every cell, resampled within its source (default: 0.95)")
    p.add_argument("--no-ci", action="store_true", help=no_ci_help)
    p.add_argument("--n-boot", type=cli_types.count_type("resample", 10, cli_types.RESAMPLES_MAX), default=1000,
                   help=f"bootstrap resamples, 10 to {cli_types.RESAMPLES_MAX:,} (default: 1000)")


def _ci_level(args) -> float | None:
    """The interval level the command asked for (None with --no-ci); --ci and --n-boot are checked as parsed."""
    return None if args.no_ci else args.ci


def _add_report_parser(sub) -> None:
    """``shiftbn report``: the demo's HTML report for the user's model and data."""
    p = sub.add_parser("report", epilog=EPILOG, help="the demo's HTML report for your model and data",
                       description="Per-source BN statistics and the layer shift profile, the cross-source matrix with "
                                   "bootstrap intervals, paired strategy comparisons, the held-out view, per-source "
                                   "calibration and confusion, and a generated reading; writes report.html, "
                                   "matrix.csv, comparisons.csv, pooled.csv, shift.csv and stats.json into --out. "
                                   "Nothing is trained.")
    _user_model_command(p)
    p.add_argument("--held-out", nargs="+", default=[], metavar="SOURCE",
                   help="sources the model was trained WITHOUT (marked in the matrix; their rows are the held-out "
                        "view)")
    p.add_argument("--strategies", nargs="+", default=["ema", "precise", "target", "prior:16", "stats:*"],
                   help="strategy specs (default: ema precise target prior:16 stats:*)")
    p.add_argument("--calibration", type=cli_types.fraction, default=0.5,
                   help="fraction of each source used unlabeled for statistics; the rest is evaluated (default 0.5)")
    _add_ci_args(p, "no intervals (faster; the reading then claims no difference)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output folder (default: runs/report)")


def _import_factory(spec: str):
    """The callable named by ``--model``: a library's model (``timm:NAME``, ``torchvision:NAME``,
    ``monai:NAME``, see ``integrations.models``) or ``MODULE:FACTORY``."""
    from shiftbn.integrations.models import model_factory

    factory = model_factory(spec, "--model")
    if factory is not None:
        return factory
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must look like package.module:factory, got {spec!r}")
    module = _import_user_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r} for --model")
    return factory


def _import_user_module(name: str):
    """Import ``name``; the working folder is searched last, and only for this import.

    Why: putting the working folder first let any stray ``PIL/`` or ``json.py`` there shadow the
    libraries shiftbn imports later.
    """
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        found = False
    cwd = str(Path.cwd())
    appended = not found and cwd not in sys.path
    if appended:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"cannot import {name!r} for --model: {e}") from None
    except Exception as e:  # the user's module itself failed while importing
        raise ValueError(f"importing {name!r} for --model raised {_describe(e)}") from e
    finally:
        if appended and sys.path and sys.path[-1] == cwd:
            sys.path.pop()


def _describe(e: BaseException) -> str:
    """``Type: first line of the message`` (just the type when the message is empty)."""
    first = _first_line(e)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _first_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = str(msg).strip()
    return text.splitlines()[0] if text else ""


def _load_user_model(args):
    import pickle

    import torch

    factory = _import_factory(args.model)
    kwargs = _model_kwargs(args.model_kwargs)
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's factory is reported as one line
        raise ValueError(f"--model {args.model}: the factory raised {_describe(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{args.model} returned {type(model).__name__}, not a torch.nn.Module")
    if not args.weights.exists():
        raise FileNotFoundError(f"--weights file not found: {args.weights}")
    if not args.weights.is_file():
        raise ValueError(f"--weights {args.weights} is not a file")
    resave = "re-save a plain state dict with torch.save(model.state_dict(), path)"
    try:
        state = torch.load(args.weights, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # never relay torch's hint to load with weights_only=False: unpickling can run any code
        if "GLOBAL" not in str(e):  # not a refused class or function: the pickle stream itself is bad
            raise ValueError(f"{args.weights} is not a readable torch checkpoint (corrupt pickle); {resave}") from None
        raise ValueError(f"{args.weights} holds non-tensor Python objects (a pickled model or custom classes), "
                         f"which are not loaded because unpickling them can run code; {resave}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise ValueError(f"{args.weights} is not a readable torch checkpoint ({type(e).__name__}); {resave}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{args.weights} holds {type(state).__name__}, expected a state dict; {resave}")
    state = _state_dict_of(state, args.weights, args.state_key, args.strip_prefix)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--weights do not fit the model from --model: {str(e).splitlines()[0]}") from None
    try:
        device = torch.device(args.device)
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    return model.eval()


def _model_kwargs(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as factory keyword arguments (see ``integrations.models.parse_model_kwargs``)."""
    from shiftbn.integrations.models import parse_model_kwargs

    return parse_model_kwargs(items, "--model-kwargs")


def _state_dict_of(state: dict, path: Path, key: str | None, prefix: str | None) -> dict:
    """The tensors to load: ``state[key]`` when given, with ``prefix`` stripped from the keys."""
    if key is not None:
        if key not in state or not isinstance(state[key], dict):
            raise ValueError(f"--state-key {key!r}: {path} has no dict under that key; its keys: {sorted(state)[:10]}")
        state = state[key]
    elif state and not any(hasattr(v, "shape") for v in state.values()):
        hint = " (Lightning: --state-key state_dict --strip-prefix model.)" if "state_dict" in state else ""
        raise ValueError(f"{path} holds no tensors at its top level (keys {sorted(state)[:10]}); name the key of the "
                         f"state dict with --state-key{hint}")
    if prefix is not None:
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"--strip-prefix {prefix!r}: no key of the state dict starts with it "
                             f"(first keys: {list(state)[:3]})")
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def _check_out(path: Path) -> None:
    """Refuse an ``--out`` that exists but is not a folder (before any slow work)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} exists and is a file, not a folder; choose another --out")


def _out_folder(path: Path) -> Path:
    """``path`` as an existing folder for outputs, or a one-line error naming it."""
    _check_out(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FileExistsError(f"--out {path}: a parent folder is a file; choose another --out") from None
    except OSError as e:  # no permission, a read-only or virtual file system
        raise OSError(f"--out {path}: cannot create the folder ({e.strerror}); choose another --out") from None
    return path


def _load_user_data(args):
    """The user's data as a ``SourceTaggedDataset``; unreadable image files are skipped (listed in
    ``args.skipped``) or, with ``--strict``, refused naming the first one."""
    from shiftbn.data.files import camelyon17, from_folder, from_frame
    from shiftbn.data.images import FileDataset
    from shiftbn.data.loaders import ImageLoader, find_unreadable

    _check_batch_memory(args)
    mean, std = (None, None) if args.normalize is None else args.normalize  # checked as parsed (cli_types.Normalize)
    loader = ImageLoader(channels=args.channels, size=args.image_size, mean=mean, std=std)
    if not args.data.exists():
        raise FileNotFoundError(f"--data not found: {args.data}")
    if args.data.is_dir() and (args.data / "metadata.csv").is_file():
        ds = camelyon17(args.data, loader=loader)  # the WILDS Camelyon17 layout
    elif args.data.is_dir():
        ds = from_folder(args.data, loader=loader)
    else:
        label = None if args.label_col.lower() == "none" else args.label_col
        ds = from_frame(args.data, path=args.path_col, label=label, source=args.source_col, loader=loader,
                        allow_outside=args.allow_outside)
    args.skipped = None
    if isinstance(ds.base, FileDataset):
        bad = find_unreadable(ds.base.paths)
        if len(bad) and args.strict:
            raise ValueError(f"unreadable image file {bad['path'].iloc[0]} ({bad['error'].iloc[0]}) and "
                             f"{len(bad) - 1} more; remove them or drop --strict to skip them")
        if len(bad):
            unreadable = set(bad["path"])
            ds = ds.take([i for i, p in enumerate(ds.base.paths) if p not in unreadable])
            args.skipped = bad  # main() reports them once the command succeeded: a failure stays one line
    return ds


def _check_batch_memory(args) -> None:
    """Refuse an --image-size whose batches of float32 images would take more than half of this machine's
    memory (before any image is read): the allocation would fail or swap, minutes in."""
    if args.image_size is None:
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    need = args.batch_size * (args.channels or 3) * args.image_size**2 * 4
    if need > total // 2:
        raise ValueError(f"--image-size {args.image_size} with --batch-size {args.batch_size}: one batch of float32 "
                         f"images takes {need / 2**30:.1f} GiB, more than half of this machine's "
                         f"{total / 2**30:.1f} GiB; lower --image-size or --batch-size")


def _write_skipped(args, folder: Path) -> None:
    """Write the skipped files (if any) as ``skipped.csv`` into ``folder``."""
    from shiftbn._io import atomic_write_text

    if getattr(args, "skipped", None) is not None:
        atomic_write_text(folder / "skipped.csv", args.skipped.to_csv(index=False))


def _progress(args) -> bool:
    """Whether the library may draw progress bars: asked for, not --quiet, and stderr is a terminal."""
    return _log.bars_wanted(not args.no_progress)


def _cmd_demo(args) -> None:
    from shiftbn.studies.demo import run_demo

    result = run_demo(args.out, dataset=args.dataset, quick=args.quick, resume=args.resume, seed=args.seed,
                      progress=_progress(args))
    from shiftbn.studies.report import interval_cells

    acc = result.matrix.query("metric == 'accuracy' and not is_cross_source")
    level = " [95% interval]" if "ci_low" in acc.columns else ""
    print(f"\nAccuracy by strategy (rows) and lab (columns){level}:")
    print(interval_cells(acc, "strategy", "eval_source").to_string(index=False))
    s = result.summary.query("metric == 'accuracy'")[["strategy", "mean", "worst_source", "worst", "gap"]]
    print("\nSummary over labs:")
    print(s.round(3).to_string(index=False))
    print(f"\nReport: {result.report}")


def _cmd_run(args) -> None:
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

    run = RankSync().check(lambda: RunFolder(out, config, resume=args.resume) if _dist.writer() else None)
    try:  # under torchrun rank 0 alone holds the folder; the cells are spread over the ranks
        table = run_study(spec, run, quick=args.quick, progress=_progress(args))
    finally:
        if run is not None:
            run.close()
    print(f"{len(table)} result rows in {out / 'results.csv'}")


def _cmd_stats(args) -> None:
    from shiftbn._io import atomic_write_text
    from shiftbn.bn import collect_stats, stats_shift

    to_file = cli_files.writes_file(args)
    if not to_file:
        _check_out(args.out)
    model, ds = _load_user_model(args), _load_user_data(args)
    stats = collect_stats(model, ds, batch_size=args.batch_size, num_samples=args.num_samples, mode=args.mode,
                          seed=args.seed, progress=_progress(args), amp=args.amp)
    cli_files.check_floor(args, stats)
    if to_file:
        return cli_files.write_site(args, model, stats) if _dist.writer() else None
    shift = stats_shift(stats, metric="all")
    if _dist.writer():
        _out_folder(args.out)
        _write_skipped(args, args.out)
        atomic_write_text(args.out / "stats.json", json.dumps(stats.to_dict()))
        atomic_write_text(args.out / "stats.csv", stats.to_frame().to_csv(index=False))
        atomic_write_text(args.out / "shift.csv", shift.to_csv(index=False))
    print(shift[shift["metric"] == "w2"].pivot_table(index="layer", columns="source", values="value", sort=False)
          .round(4).to_string())
    print(f"\nWrote {args.out / 'stats.json'}, stats.csv and shift.csv")


def _cmd_matrix(args) -> None:
    from shiftbn._io import atomic_write_text
    from shiftbn.evaluate import cross_source_matrix
    from shiftbn.studies.report import interval_cells

    level = _ci_level(args)
    _check_out(args.out)
    files = cli_files.matrix_stats(args)
    model, ds = _load_user_model(args), _load_user_data(args)
    if files is not None:
        table = cli_files.matrix_from_files(model, ds, files, args, level)
    else:
        table = cross_source_matrix(model, ds, args.strategies, args.metrics,
                                    calibration=0.5 if args.calibration is None else args.calibration,
                                    stats_batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed,
                                    ci=level, n_boot=args.n_boot, progress=_progress(args), amp=args.amp)
    if _dist.writer():
        atomic_write_text(_out_folder(args.out) / "matrix.csv", table.to_csv(index=False))
        _write_skipped(args, args.out)
    for metric, g in table.groupby("metric", sort=False):
        print(f"\n{metric}{'' if level is None else f' [{level:.0%} interval]'}:")
        print(interval_cells(g, "strategy", "eval_source").to_string(index=False))
    print(f"\nWrote {args.out / 'matrix.csv'}")


def _cmd_recalibrate(args) -> None:
    from shiftbn._io import atomic_save_torch
    from shiftbn.sites import recalibrate

    if args.output.resolve() == args.weights.resolve():
        raise ValueError("--output is the input checkpoint; recalibrate never overwrites its input")
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to replace it")
    if args.stats is not None:
        return cli_files.recalibrate_from_files(args, _load_user_model)
    if args.data is None:
        raise ValueError("recalibrate needs --data (images) or --stats (statistics files)")
    model, ds = _load_user_model(args), _load_user_data(args)
    stats = recalibrate(model, ds, target=args.target, method=args.method, batch_size=args.batch_size,
                        num_samples=args.num_samples, seed=args.seed, progress=_progress(args), amp=args.amp)
    if _dist.writer():
        atomic_save_torch(args.output, model.state_dict())
    where = f"source {args.target!r}" if args.target else "all data"
    print(f"Wrote {args.output}: BN statistics from {stats.num_samples} samples of {where} ({args.method})")


def _cmd_report(args) -> None:
    from shiftbn.studies.report import build_report

    level = _ci_level(args)
    _check_out(args.out)
    model, ds = _load_user_model(args), _load_user_data(args)
    report = build_report(model, ds, _out_folder(args.out), held_out=args.held_out, strategies=args.strategies,
                          calibration=args.calibration, ci=level, n_boot=args.n_boot,
                          stats_batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed,
                          amp=args.amp, progress=_progress(args))
    _write_skipped(args, args.out)
    import pandas as pd

    from shiftbn.studies.report import interval_cells

    matrix = pd.read_csv(args.out / "matrix.csv")
    acc = matrix[(matrix["metric"] == "accuracy") & ~matrix["is_cross_source"]]
    word = ds.source_word
    print(f"Accuracy by strategy (rows) and {word} (columns){'' if level is None else f', [{level:.0%} interval]'}:")
    print(interval_cells(acc, "strategy", "eval_source").to_string(index=False))
    print(f"\nReport: {report}")


COMMANDS = {"demo": _cmd_demo, "run": _cmd_run, "stats": _cmd_stats, "matrix": _cmd_matrix,
            "recalibrate": _cmd_recalibrate, "report": _cmd_report, "merge": cli_files.cmd_merge,
            "monitor": cmd_monitor}


# Errors a user can fix from the message alone (ours, the OS's, torch's about shapes and dtypes).
_EXPECTED = (ValueError, TypeError, OSError, ImportError, KeyError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shiftbn`` console script; returns the exit status.

    Every error prints one line and returns 2; an unexpected one also names where it was raised
    and how to see the traceback (``SHIFTBN_DEBUG=1`` re-raises every error). A command may return
    its own status (``monitor``: 1 on an alert).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # an argument error (one line, printed): its status; --help and --version exit
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2
    if args.command is None:  # bare `shiftbn`: the overview, not an error
        parser.print_help()
        return 0
    debug = os.environ.get("SHIFTBN_DEBUG", "") not in ("", "0")
    was_quiet, threads_before = _log.quiet(), None
    _log.set_quiet(was_quiet or getattr(args, "quiet", False))
    _log.restart_clock()
    try:
        threads_before = _set_threads(getattr(args, "threads", None))
        with _dist.session(args), old_spelling_notes(args):
            status = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"shiftbn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the boundary: a user's model may raise anything
        if debug:
            raise
        if _dist.should_print(e):
            print(f"shiftbn {args.command}: {_dist.prefix(e)}error: {_error_line(e)}", file=sys.stderr)
        return 2
    finally:  # main() called in-process (tests, notebooks) leaves the process as it found it
        _log.set_quiet(was_quiet)
        if threads_before is not None:
            _set_threads(threads_before)
    _note_skipped(args)
    return int(status or 0)


def _note_skipped(args) -> None:
    """One stderr line about unreadable image files the command skipped (after it succeeded)."""
    bad = getattr(args, "skipped", None)
    if bad is None or not len(bad):
        return
    listed = f"; listed in {args.out / 'skipped.csv'}" if getattr(args, "out", None) else ""
    print(f"shiftbn {args.command}: skipped {len(bad)} unreadable image file(s), e.g. {bad['path'].iloc[0]}{listed}",
          file=sys.stderr)


def _set_threads(n: int | None) -> int | None:
    """``torch.set_num_threads(n)`` before any work; returns the previous count (None when ``n`` is None).

    Why not a default count: torch's own (the physical cores, or ``$OMP_NUM_THREADS``) is already
    one per core, and a count the caller chose (an embedding process, a test) must stand.
    """
    if n is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _error_line(e: BaseException) -> str:
    """The message of an error a user can act on; for one raised in the user's code or of an unexpected
    type, also where it was raised and how to see the traceback."""
    frames = _frames(e)
    user = [f for f in frames if not _is_library(f.filename)]
    if isinstance(e, _EXPECTED) and not (frames and frames[-1] in user):
        return _first_line(e) or type(e).__name__
    frame = (user or frames)[-1]
    where = f"{frame.name} ({Path(frame.filename).name}:{frame.lineno})"
    return f"{_describe(e)} (raised in {where}); run with SHIFTBN_DEBUG=1 for the traceback"


def _frames(e: BaseException) -> list:
    import traceback

    return list(traceback.extract_tb(e.__traceback__))


def _is_library(filename: str) -> bool:
    """Whether a traceback file belongs to shiftbn, an installed package or the standard library."""
    path = str(Path(filename).resolve())
    roots = (str(Path(__file__).resolve().parent), sys.prefix, sys.base_prefix,
             str(Path(importlib.__file__).resolve().parents[1]))
    return path.startswith(roots) or filename.startswith("<")


def run_as_script() -> None:
    """``python -m shiftbn`` / ``python -m shiftbn.cli.main``: drop the working folder python put first on
    ``sys.path`` (``--model`` searches it last, for its own module only), run ``main``, exit."""
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", str(Path.cwd())):
        del sys.path[0]
    sys.exit(main())


if __name__ == "__main__":
    run_as_script()
