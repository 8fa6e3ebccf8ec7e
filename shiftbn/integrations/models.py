"""Models named by library: ``timm:resnet50d``, ``torchvision:resnet18``, ``monai:DenseNet121``.

Why: a user whose network comes from timm, torchvision or MONAI should not write a factory module
to hand it to the CLI; the libraries' own factories (``timm.create_model``,
``torchvision.models.get_model``, ``monai.networks.nets.<Name>``) build it from its name. Nothing is
downloaded: no pretrained weights are asked for (the weights come from the user's file).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import json
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

LIBRARIES = ("timm", "torchvision", "monai")
BUILTIN = ("unet2d", "unet3d")  # shiftbn's own small models, named without a library: --model unet3d
_PAIR_START = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_]*=)")


def _library(name: str, flag: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"{flag} {spec} needs {name.split('.')[0]}, which is not installed ({e}); "
                         f"pip install {name.split('.')[0]}") from None


def _unknown(flag: str, spec: str, known: Sequence[str], what: str) -> ValueError:
    lib, _, name = spec.partition(":")
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(f'{lib}:{c}' for c in close)}?" if close else ""
    return ValueError(f"{flag} {spec}: {lib} has no {what} {name!r}{hint}")


def model_factory(spec: str, flag: str = "model") -> Callable[..., Any] | None:
    """The library's factory for ``"timm:NAME"``, ``"torchvision:NAME"`` or ``"monai:NAME"``, shiftbn's own
    ``"unet2d"``/``"unet3d"`` (``shiftbn.studies.models``), else None.

    Why: names are parsed once, at the boundary; a spec of another form (``package.module:factory``)
    is left to the caller. A library module's own callable (``timm:create_model``) is also left to
    the caller. ``flag`` names the option in messages (``"--model"`` for the CLI).
    Returns a callable taking the model's keyword arguments, e.g. ``model_factory("timm:resnet18")(
    num_classes=2)``. Raises ``ValueError`` naming the flag for an unknown model or a missing library.
    """
    if not isinstance(spec, str):
        raise TypeError(f"{flag} must be a string such as 'timm:resnet50d', got {spec!r}")
    if spec in BUILTIN:
        return getattr(importlib.import_module("shiftbn.studies.models"), spec)
    lib, sep, name = spec.partition(":")
    if not sep or lib not in LIBRARIES:
        return None
    if not name:
        raise ValueError(f"{flag} {spec}: name the model after the colon, e.g. {lib}:"
                         f"{ {'timm': 'resnet50d', 'torchvision': 'resnet18', 'monai': 'DenseNet121'}[lib]}")
    if lib == "timm":
        timm = _library("timm", flag, spec)
        if timm.is_model(name):
            return partial(timm.create_model, name)
        if callable(getattr(timm, name, None)):
            return None
        raise _unknown(flag, spec, timm.list_models(), "model")
    if lib == "torchvision":
        models = _library("torchvision.models", flag, spec)
        names = models.list_models()
        if name.lower() in names:
            return partial(models.get_model, name.lower())
        if callable(getattr(importlib.import_module("torchvision"), name, None)):
            return None
        raise _unknown(flag, spec, names, "model")
    nets = _library("monai.networks.nets", flag, spec)
    import torch

    cls = getattr(nets, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls
    known = [k for k, v in vars(nets).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)]
    raise _unknown(flag, spec, known, "network in monai.networks.nets")


def parse_model_kwargs(items: Sequence[str], flag: str = "--model-kwargs") -> dict[str, Any]:
    """``KEY=VALUE`` strings as keyword arguments, parsed once: ints, floats, bools, None, tuples, strings.

    Each item may hold several pairs separated by commas (``spatial_dims=2,in_channels=3``); a value
    is read as JSON (``2``, ``0.5``, ``true``, ``[16, 32]``), then as a Python literal (``True``,
    ``(16, 32)``), then as comma-separated values (``16,32,64`` -> ``(16, 32, 64)``); anything else
    stays a string. Raises ``ValueError`` naming ``flag`` for an item without ``=`` or a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items:
        for pair in _PAIR_START.split(item):
            key, sep, raw = pair.partition("=")
            if not sep or not key.isidentifier():
                raise ValueError(f"{flag} takes KEY=VALUE pairs (several per item separated by commas), got "
                                 f"{pair!r} (e.g. num_classes=2 or spatial_dims=2,in_channels=3)")
            if key in out:
                raise ValueError(f"{flag}: {key} is given twice ({out[key]!r} and {raw!r}); give it once")
            out[key] = _value(raw)
    return out


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if "," in raw:
        parts = [p.strip() for p in raw.split(",")]
        if all(parts):
            return tuple(_value(p) for p in parts)
    return raw
