"""What every command that runs the user's model shares: the model and its checkpoint, the data, the
output folder, progress and threads — their options, and loading them.

Why: one place parses ``--model``/``--weights``/``--data`` and reports their mistakes, so every
command refuses the same mistake with the same line. Each command calls these functions on its own
parser. Standard library only at import (``--help`` stays fast); the loaders import what they need.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import shiftbn._log as _log
import shiftbn.cli.types as cli_types

SEED_HELP = "seed of every random choice: subsets, random batches, calibration splits"


# ---------------------------------------------------------------- options

def add_user_options(p: argparse.ArgumentParser, data_or: str | None = None) -> None:
    """The user's model, checkpoint and device, then the data and how it is batched; ``data_or`` names
    an option that can replace ``--data`` (then ``--data`` is not required and its help says so)."""
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
    add_forward_option(p)
    data_help = ("manifest CSV/Parquet (columns path,label,source) or an image folder root/<source>/<class>/; "
                 "pixels are mapped to [0, 1]: 8-bit files / 255, 16-bit grayscale / 65535, 32-bit float as "
                 "stored (refused outside [0, 1]), 32-bit integer refused")
    p.add_argument("--data", required=data_or is None, type=Path,
                   help=data_help if data_or is None else f"{data_help} (or {data_or})")
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
    p.add_argument("--transform", default=None, metavar="MODULE:FUNCTION",
                   help="your own preprocessing, called on each image as a float tensor (C, H, W) in [0, 1]: the "
                        "order is read -> --channels -> --image-size -> the transform -> --normalize; it returns a "
                        "tensor or numpy array. FUNCTION is the transform itself (one image argument), or a factory "
                        "called with no arguments that returns it (a class such as "
                        "monai.transforms:ScaleIntensity, or make() returning Compose([...])); MONAI array "
                        "transforms work, dict transforms (...d) do not (the working folder is searched last)")
    p.add_argument("--normalize", nargs=2, type=cli_types.numbers, action=cli_types.Normalize, default=None,
                   metavar=("MEAN", "STD"),
                   help="normalize as (x - MEAN) / STD after scaling to [0, 1]; one number or one per channel, "
                        "comma-separated (ImageNet: 0.485,0.456,0.406 0.229,0.224,0.225)")
    p.add_argument("--strict", action="store_true",
                   help="refuse unreadable image files instead of skipping them (skipped files are listed in "
                        "skipped.csv in the output folder)")
    p.add_argument("--allow-outside", action="store_true",
                   help="let manifest paths point outside the manifest's folder (otherwise refused)")
    p.add_argument("--batch-size", type=cli_types.count_type("sample"), default=64,
                   help="batch size for statistics (default: 64)")
    p.add_argument("--num-samples", type=cli_types.count_type("sample"), default=None,
                   help="at most this many samples per source")
    p.add_argument("--seed", type=cli_types.seed, default=0, help=SEED_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_forward_option(p: argparse.ArgumentParser) -> None:
    """``--forward MODULE:FUNCTION``: the user's ``forward(model, x)``, for the commands that run the model."""
    p.add_argument("--forward", default=None, metavar="MODULE:FUNCTION",
                   help="your own forward(model, x) -> outputs, called on every batch instead of model(x) (x: the "
                        "batch's inputs on --device): multi-input models, micro-batches, sliding-window inference "
                        "(e.g. MONAI's sliding_window_inference); statistics stay exact per source (API: forward=; "
                        "the working folder is searched last)")


def load_forward(args):
    """The callable named by ``--forward MODULE:FUNCTION`` (None without ``--forward``)."""
    spec = getattr(args, "forward", None)
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--forward must look like package.module:function, got {spec!r}")
    module = _import_user_module(module_name, "--forward")
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = "" if fn is None else f" ({attr} is of type {type(fn).__name__})"
        raise ValueError(f"--forward {spec}: {module_name} has no callable {attr!r}{found}; name a function "
                         "forward(model, x) -> outputs")
    return fn


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that computes: threads, quiet."""
    resume = ", and a --resume under another count is refused" if "--resume" in p._option_string_actions else ""
    p.add_argument("--threads", type=cli_types.threads, default=None, metavar="N",
                   help="torch threads for this run, set before any work and recorded in environment.json; "
                        f"numbers can differ in the last digits between thread counts{resume} (default: torch's "
                        "own: the physical cores, or $OMP_NUM_THREADS; running P processes side by side, give each "
                        "cores/P)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no phase lines and no progress bars on stderr (results and errors still print)")


EVAL_BATCH = 256


def add_eval_batch_option(p: argparse.ArgumentParser) -> None:
    """``--eval-batch-size``: samples per evaluation forward of the commands that score strategies."""
    p.add_argument("--eval-batch-size", type=cli_types.count_type("sample"), default=EVAL_BATCH, metavar="N",
                   help="samples (or volumes) per evaluation forward; the numbers do not depend on it, the memory "
                        f"does: lower it for large images or 3-D volumes (default: {EVAL_BATCH}; the statistics' "
                        "batches are --batch-size, except prior:N@n's few-shot ones, which are these; batch:B, "
                        "prior:N and tent group test samples by their own B)")


CACHE_MB = 1024


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """``--cache-mb``, ``--cache-dir``, ``--cache-disk-mb``: the decode cache of commands that read the data
    many times (``shiftbn.data.cached``)."""
    p.add_argument("--cache-mb", type=cli_types.count_type("MiB", 0), default=CACHE_MB, metavar="MB",
                   help="memory for decoded images, so that each file is decoded once for all passes of the run; "
                        "data larger than that goes to a memory-mapped file in --cache-dir; 0 with --cache-disk-mb "
                        f"0: decode every file on every pass (default: {CACHE_MB})")
    p.add_argument("--cache-dir", type=_existing_folder, default=None, metavar="DIR",
                   help="folder (on local disk) of that file, removed when the run ends, also on Ctrl-C "
                        "(default: the system's temporary folder)")
    p.add_argument("--cache-disk-mb", type=cli_types.count_type("MiB", 0), default=None, metavar="MB",
                   help="size limit of that file (default: what the data needs while 1 GiB stays free); files past "
                        "the limit are decoded on every pass")


def _existing_folder(text: str) -> Path:
    """``--cache-dir``: an existing folder (checked as parsed, before any slow work)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not an existing folder; create it or choose another")
    return Path(text)


def cached_data(args, ds):
    """``ds`` decoded once for the whole command (``--cache-mb``, ``--cache-dir``, ``--cache-disk-mb``)."""
    from shiftbn.data.cache import cached

    disk = None if args.cache_disk_mb is None else args.cache_disk_mb << 20
    return cached(ds, args.cache_mb << 20, dir=args.cache_dir, disk_bytes=disk)


def add_ci_options(p: argparse.ArgumentParser, no_ci_help: str) -> None:
    """--ci, --no-ci and --n-boot, for the commands that print intervals."""
    p.add_argument("--ci", type=cli_types.fraction, default=0.95, metavar="LEVEL",
                   help="bootstrap interval level of every cell, resampled within its source (default: 0.95)")
    p.add_argument("--no-ci", action="store_true", help=no_ci_help)
    p.add_argument("--n-boot", type=cli_types.count_type("resample", 10, cli_types.RESAMPLES_MAX), default=1000,
                   help=f"bootstrap resamples, 10 to {cli_types.RESAMPLES_MAX:,} (default: 1000)")


PRECISE_HELP = "precise = PreciseBN over the training sources' calibration data (every source not in --held-out)"


def add_held_out_option(p: argparse.ArgumentParser, api: str) -> None:
    """``--held-out``: the sources the model was trained without, which ``precise`` leaves out;
    ``api`` names the library argument that does the same."""
    p.add_argument("--held-out", nargs="+", default=[], metavar="SOURCE",
                   help=f"sources the model was trained WITHOUT (marked as the held-out view); {PRECISE_HELP}; "
                        f"API: {api} (default: none held out: every source counts as a training source)")


def check_held_out(held_out, sources, flag: str = "--held-out") -> None:
    """Refuse a ``--held-out`` (or ``flag``) name that is not one of ``sources``, suggesting the closest one."""
    check_sources(held_out, sources, flag)


def check_sources(names, sources, flag: str) -> None:
    """Refuse a name in ``names`` (given with ``flag``) that is not one of ``sources``, suggesting the
    closest one (same letters in another case first, then difflib's closest spelling)."""
    import difflib

    known = [str(s) for s in sources]
    for h in names:
        if h not in known:
            close = [k for k in known if k.lower() == h.lower()] or difflib.get_close_matches(h, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"{flag} {h!r} is not a source of the data (sources: {', '.join(known)}){hint}")


def training_sources(held_out, sources) -> list[str]:
    """The sources not in ``--held-out``; unknown names and holding out every source are refused."""
    check_held_out(held_out, sources)
    known = [str(s) for s in sources]
    trains = [s for s in known if s not in set(held_out)]
    if not trains:
        raise ValueError(f"--held-out names every source ({', '.join(known)}); leave at least one source the model "
                         "was trained on")
    return trains


def ci_level(args) -> float | None:
    """The interval level the command asked for (None with --no-ci); --ci and --n-boot are checked as parsed."""
    return None if args.no_ci else args.ci


def progress(args) -> bool:
    """Whether the library may draw progress bars: asked for, not --quiet, and stderr is a terminal."""
    return _log.bars_wanted(not args.no_progress)


# ---------------------------------------------------------------- the model

def build_model(spec: str, kwargs: list[str]):
    """The user's model from ``--model`` and ``--model-kwargs`` (weights not loaded yet); every way of
    naming a model resolves here."""
    import torch

    factory = _import_factory(spec)
    try:
        model = factory(**_model_kwargs(kwargs))
    except Exception as e:  # noqa: BLE001 - any failure of the user's factory is reported as one line
        raise ValueError(f"--model {spec}: the factory raised {describe(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(args):
    """The user's model with the ``--weights`` checkpoint loaded, on ``--device``, in eval mode."""
    import pickle

    import torch

    model = build_model(args.model, args.model_kwargs)
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


def _import_user_module(name: str, flag: str = "--model"):
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
        raise ValueError(f"cannot import {name!r} for {flag}: {e}") from None
    except Exception as e:  # the user's module itself failed while importing
        raise ValueError(f"importing {name!r} for {flag} raised {describe(e)}") from e
    finally:
        if appended and sys.path and sys.path[-1] == cwd:
            sys.path.pop()


def load_transform(spec: str):
    """The callable named by ``--transform MODULE:FUNCTION``: FUNCTION itself when it needs an argument
    (the transform), else what FUNCTION() returns (a factory, or a class whose instances transform)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--transform must look like package.module:function, got {spec!r}")
    module = _import_user_module(module_name, "--transform")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no callable {attr!r} for --transform")
    if not _takes_no_arguments(fn):
        return fn
    try:
        made = fn()
    except Exception as e:  # noqa: BLE001 - any failure of the user's factory is reported as one line
        raise ValueError(f"--transform {spec}: calling it with no arguments (as a factory) raised {describe(e)}") from e
    if not callable(made):
        raise TypeError(f"--transform {spec}: {attr}() returned {type(made).__name__}, not a callable; name a function "
                        "of one image tensor, or a factory with no arguments that returns one")
    return made


def _takes_no_arguments(fn) -> bool:
    """Whether ``fn()`` binds (no required parameter); False when its signature cannot be read."""
    import inspect

    try:
        inspect.signature(fn).bind()
    except (TypeError, ValueError):
        return False
    return True


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


def describe(e: BaseException) -> str:
    """``Type: first line of the message`` (just the type when the message is empty)."""
    first = first_line(e)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (a KeyError's key without its quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = str(msg).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------- the data

def load_data(args):
    """The user's data as a ``SourceTaggedDataset``; unreadable image files are skipped (listed in
    ``args.skipped``) or, with ``--strict``, refused naming the first one."""
    from shiftbn.data.files import camelyon17, from_folder, from_frame
    from shiftbn.data.images import FileDataset
    from shiftbn.data.loaders import ImageLoader, find_unreadable
    from shiftbn.data.segfiles import seg_layout

    _check_batch_memory(args)
    mean, std = (None, None) if args.normalize is None else args.normalize  # checked as parsed (cli_types.Normalize)
    transform = None if args.transform is None else load_transform(args.transform)
    loader = ImageLoader(channels=args.channels, size=args.image_size, mean=mean, std=std, transform=transform)
    if not args.data.exists():
        raise FileNotFoundError(f"--data not found: {args.data}")
    if seg_layout(args.data) is not None:
        args.skipped = None
        return _seg_data(args, loader)
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


def _seg_data(args, loader):
    """Segmentation data (``root/<source>/images|masks/`` or a manifest with image, mask columns): 2-D
    image files go through ``loader``; NIfTI volumes are read as stored, so options that would not
    reach them, or would not reach the masks (--image-size), are refused rather than ignored."""
    from shiftbn.data.segfiles import check_one_shape, from_seg_folder, from_seg_frame, is_nifti

    if args.image_size is not None:
        raise ValueError("--image-size resizes images but not their masks, so it is not available for segmentation "
                         "data; resize images and masks beforehand, or drop --image-size")
    if args.data.is_dir():
        ds = from_seg_folder(args.data, loader=loader)
    else:
        ds = from_seg_frame(args.data, source=args.source_col, loader=loader, allow_outside=args.allow_outside)
    given = [flag for flag, value in (("--channels", args.channels), ("--normalize", args.normalize),
                                      ("--transform", args.transform)) if value is not None]
    if given and any(is_nifti(p) for p in ds.base.images):
        raise ValueError(f"{given[0]} is applied to 2-D image files only, and --data holds NIfTI volumes (read as "
                         f"stored); drop {given[0]} and normalize inside the model")
    if args.command in ("matrix", "report"):  # evaluation forwards, groupings and overlays stack cases
        pooled = [s for s in ds.source_names if s not in set(getattr(args, "held_out", []))] \
            if "precise" in (getattr(args, "strategies", None) or []) else []
        why = (f"resample or crop them to one shape (shiftbn {args.command} stacks cases into batches: "
               "--eval-batch-size, the groupings of batch:B and prior:N, the overlays)")
        check_one_shape(ds, why, pooled, "drop precise from --strategies, or resample or crop the volumes to one "
                        "shape")
    elif args.batch_size > 1:
        check_one_shape(ds, "use --batch-size 1, or resample or crop them to one shape")
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
    flag, size = max((("--batch-size", args.batch_size),
                      ("--eval-batch-size", getattr(args, "eval_batch_size", 0))), key=lambda fs: fs[1])
    need = size * (args.channels or 3) * args.image_size**2 * 4
    if need > total // 2:
        raise ValueError(f"--image-size {args.image_size} with {flag} {size}: one batch of float32 "
                         f"images takes {need / 2**30:.1f} GiB, more than half of this machine's "
                         f"{total / 2**30:.1f} GiB; lower --image-size or {flag}")


def stats_files(args):
    """The ``--stats`` files pooled exactly into one ``SourceStats`` (``--merge-duplicates`` decides
    a source found in several files)."""
    from shiftbn.sites import merge_stats

    return merge_stats(*args.stats, duplicates="merge" if args.merge_duplicates else "refuse")


def files_only(args, verb: str) -> None:
    """Refuse options that choose images for statistics when the statistics come from files."""
    if args.num_samples is not None:
        raise ValueError(f"--num-samples caps the samples statistics are computed from; with --stats {verb} takes "
                         "them from the files: drop --num-samples (cap where the files are written: shiftbn stats "
                         "--num-samples)")


# ---------------------------------------------------------------- outputs

def check_out(path: Path) -> None:
    """Refuse an ``--out`` that exists but is not a folder (before any slow work)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} exists and is a file, not a folder; choose another --out")


def out_folder(path: Path) -> Path:
    """``path`` as an existing folder for outputs, or a one-line error naming it."""
    check_out(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FileExistsError(f"--out {path}: a parent folder is a file; choose another --out") from None
    except OSError as e:  # no permission, a read-only or virtual file system
        raise OSError(f"--out {path}: cannot create the folder ({e.strerror}); choose another --out") from None
    return path


def check_output(out: Path, inputs, force: bool, verb: str) -> None:
    """Refuse ``--out`` when it is one of ``inputs`` (also through another path, a symlink or a hard
    link) and, unless ``force``, when it exists: a file is never replaced without asking."""
    from shiftbn._io import same_file

    for p in inputs:
        if same_file(out, Path(p)):
            raise ValueError(f"--out {out} is the input {p}; {verb} never overwrites its input: give another --out")
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it, or give another --out")


def add_floor_option(p: argparse.ArgumentParser) -> None:
    """``--min-count``, for the commands that write statistics files."""
    p.add_argument("--min-count", type=cli_types.count_type("sample"), default=None, metavar="N",
                   help="refuse to write statistics of any source built from fewer samples (a privacy floor against "
                        "exporting the moments of a handful of patients; NOT differential privacy)")


def write_skipped(args, folder: Path) -> None:
    """Write the skipped files (if any) as ``skipped.csv`` into ``folder``."""
    from shiftbn._io import atomic_write_text

    if getattr(args, "skipped", None) is not None:
        atomic_write_text(folder / "skipped.csv", args.skipped.to_csv(index=False))
