"""A model's fingerprint: its BN layers, their channels and a hash of its weights, to refuse statistics
of another model."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shiftbn.bn.layers import bn_layers, check_materialized

_BN_STATS_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies ``model`` for BN statistics: its BN layers and a hash of its weights (JSON-ready).

    Why: statistics of another network (other layers, other channels, other weights) load without
    error when shapes happen to agree and then silently normalize with the wrong numbers.
    Returns ``{"bn_layers": [{"name", "num_features"}...], "tensors": [{"name", "dtype", "shape",
    "sha256"}...], "weights_sha256": str}``. The weights are every tensor of ``model.state_dict()``
    (parameters, BN affine weight/bias and persistent non-BN buffers) EXCEPT the BN running statistics
    (``running_mean``, ``running_var``, ``num_batches_tracked``): those are exactly what recalibration
    replaces, so a recalibrated copy of the model still matches its statistics files, while any other
    change of a weight (fine-tuning, another checkpoint, a dtype cast) does not. Neither the device nor
    the BN class counts (a model converted to ``SyncBatchNorm`` for DDP keeps its fingerprint).
    """
    with warnings.catch_warnings():  # bn_layers' note on other norm layers concerns recalibration, not this
        warnings.simplefilter("ignore")
        layers = bn_layers(model)
    check_materialized(layers)
    skip = set()
    for layer in layers:
        prefix = "" if layer.name == "<root>" else layer.name + "."
        skip |= {prefix + b for b in _BN_STATS_BUFFERS}
    tensors = []
    for name, t in model.state_dict().items():
        if name in skip or not isinstance(t, torch.Tensor):
            continue
        tensors.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "sha256": _tensor_digest(t)})
    whole = hashlib.sha256()
    for t in tensors:
        whole.update(f"{t['name']}\0{t['dtype']}\0{t['shape']}\0{t['sha256']}\n".encode())
    return {"bn_layers": [{"name": layer.name, "num_features": int(layer.module.num_features)} for layer in layers],
            "tensors": tensors, "weights_sha256": whole.hexdigest()}


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values as raw bytes (CPU, contiguous), whatever its dtype."""
    flat = t.detach().to("cpu").reshape(-1).contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    return hashlib.sha256(memoryview(raw.numpy())).hexdigest()


def check_fingerprint(fp: Any, what: str) -> dict[str, Any]:
    """``fp`` if it has the structure ``model_fingerprint`` returns, else ``ValueError`` naming ``what``.

    Beyond the keys: BN layer names are distinct strings and every ``num_features`` a whole number
    >= 1, so a file's arrays can be checked against it layer by layer (``bn_channels``)."""
    ok = (isinstance(fp, Mapping) and isinstance(fp.get("bn_layers"), list) and isinstance(fp.get("tensors"), list)
          and isinstance(fp.get("weights_sha256"), str)
          and all(isinstance(x, Mapping) and isinstance(x.get("name"), str) and _whole(x.get("num_features"))
                  for x in fp["bn_layers"])
          and all(isinstance(x, Mapping) and {"name", "dtype", "shape", "sha256"} <= set(x) for x in fp["tensors"]))
    if not ok:
        raise ValueError(f"{what} is not a model fingerprint (expected the dict model_fingerprint(model) returns)")
    names = [x["name"] for x in fp["bn_layers"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what} names BN layer(s) {twice[:4]} twice; it is no model fingerprint")
    return dict(fp)


def bn_channels(fp: Mapping[str, Any]) -> dict[str, int]:
    """BN layer name -> ``num_features`` of a checked fingerprint (``check_fingerprint``)."""
    return {x["name"]: int(x["num_features"]) for x in fp["bn_layers"]}


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def fingerprint_problems(expected: Mapping[str, Any], actual: Mapping[str, Any], *, first: str = "the file",
                         second: str = "the model") -> list[str]:
    """Every way two fingerprints differ, one phrase each naming the layer or tensor and the field."""
    problems = []
    a = {x["name"]: x["num_features"] for x in expected["bn_layers"]}
    b = {x["name"]: x["num_features"] for x in actual["bn_layers"]}
    only_a, only_b = [n for n in a if n not in b], [n for n in b if n not in a]
    if only_a or only_b:
        problems.append(f"BN layer names differ: in {first} only {_few(only_a)}, in {second} only {_few(only_b)}"
                        + _prefix_hint(only_a, only_b))
    for n in a:
        if n in b and a[n] != b[n]:
            problems.append(f"BN layer {n!r}: num_features {a[n]} in {first}, {b[n]} in {second}")
    if expected["weights_sha256"] != actual["weights_sha256"] and not problems:
        problems.append(_weight_problem(expected["tensors"], actual["tensors"], first, second))
    return problems


def _weight_problem(ta: list, tb: list, first: str, second: str) -> str:
    a, b = {t["name"]: t for t in ta}, {t["name"]: t for t in tb}
    diffs = [f"tensor {n!r} missing in {second}" for n in a if n not in b]
    diffs += [f"tensor {n!r} missing in {first}" for n in b if n not in a]
    for n in a:
        if n not in b:
            continue
        for field in ("shape", "dtype", "sha256"):
            if a[n][field] != b[n][field]:
                label = "values" if field == "sha256" else field
                shown = "" if field == "sha256" else f" ({a[n][field]} in {first}, {b[n][field]} in {second})"
                diffs.append(f"tensor {n!r} {label}{shown}")
                break
    if not diffs:  # the same tensors in another order
        diffs = ["tensor order"]
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return f"weights differ (hash of parameters and non-BN buffers): {'; '.join(diffs[:3])}{more}"


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]" if names else "[]"


def _prefix_hint(only_a: list[str], only_b: list[str]) -> str:
    """A hint when the names differ by a wrapper's prefix (DDP/DataParallel add ``module.``)."""
    for p, q in ((only_a, only_b), (only_b, only_a)):
        if q and sorted(n.removeprefix("module.") for n in q) == sorted(p) and all(n.startswith("module.") for n in q):
            return " (one model is wrapped, e.g. by DistributedDataParallel: use ddp_model.module)"
    return ""
