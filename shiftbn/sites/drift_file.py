"""A fitted drift monitor as one safe file: safetensors arrays plus a versioned JSON header (never pickle).

Layout (format ``shiftbn.drift-monitor``, version 2): per BN call site ``<layer>``, tensors
``sample_mean/<layer>`` and ``sample_sq/<layer>`` (N, C) float64 (the reference's per-sample spatial
means of x and x^2: the null is drawn from them) and ``reference_mean/<layer>``, ``reference_var/<layer>``
(C,) float64 (the reference site's statistics, as a site-statistics file would hold them). The
header (safetensors ``__metadata__``, key ``shiftbn``) holds JSON: format, version, the model's
fingerprint (``bn.fingerprint``: a monitor of another model is refused, naming what differs), a
sha256 of the header's other fields and the arrays together (a changed or damaged file is refused:
an edited ``alpha`` would silently turn an alert into "ok"), layers in depth order, n_reference,
n_null, alpha, seed and the ATC fit (or null). Every field is validated on reading as well, since a
checksum recomputed after an edit proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from torch import nn

from shiftbn._io import atomic_write_bytes
from shiftbn._safefile import META_KEY, read_shiftbn_file
from shiftbn.bn import bn_layers, split_site
from shiftbn.sites.atc import ATC, ATC_SCORES
from shiftbn.sites.fingerprint import check_fingerprint, fingerprint_problems, model_fingerprint
from shiftbn.sites.sample_moments import SampleMoments

FORMAT, VERSION = "shiftbn.drift-monitor", 3  # 3: the sha256 covers the header too (2: the arrays only)
_KINDS = ("sample_mean", "sample_sq", "reference_mean", "reference_var")


def _digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the header without its own digest (canonical JSON), then every array's name, shape
    and float64 bytes in name order (tampering and truncation, of the header as of the arrays)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True,
                        separators=(",", ":")).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k], np.float64)
        h.update(f"\0{k}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_monitor(monitor, path: str | Path) -> Path:
    """Write ``monitor`` (a fitted ``DriftMonitor``) to ``path`` atomically; returns the path."""
    from safetensors.numpy import save

    path = Path(path)
    m = monitor.moments
    arrays = {}
    for k in monitor.layer_names:
        arrays[f"sample_mean/{k}"] = np.ascontiguousarray(m.mean[k], np.float64)
        arrays[f"sample_sq/{k}"] = np.ascontiguousarray(m.sq[k], np.float64)
        arrays[f"reference_mean/{k}"] = np.ascontiguousarray(monitor.reference_mean[k], np.float64)
        arrays[f"reference_var/{k}"] = np.ascontiguousarray(monitor.reference_var[k], np.float64)
    atc = monitor.atc
    header = {"format": FORMAT, "version": VERSION, "model": model_fingerprint(monitor.model),
              "layers": monitor.layer_names, "n_reference": monitor.n_reference,
              "n_null": monitor.n_null, "alpha": monitor.alpha, "seed": monitor.seed,
              "atc": None if atc is None else {"threshold": atc.threshold, "score": atc.score,
                                               "accuracy": atc.accuracy, "n": atc.n}}
    header["sha256"] = _digest(header, arrays)
    atomic_write_bytes(path, save(arrays, metadata={META_KEY: json.dumps(header)}))
    return path


def _header(path: Path) -> tuple[dict, bytes]:
    """The JSON header and bytes of a shiftbn drift-monitor file (another file or version refused)."""
    fix = "Write one with DriftMonitor.save or shiftbn monitor --reference SITE --save FILE"
    header, raw = read_shiftbn_file(path, f"{path} is not a shiftbn drift-monitor file", fix)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a shiftbn drift-monitor file: format {header.get('format')!r}. {fix}")
    if header.get("version") == 2:
        raise ValueError(f"{path} is a drift-monitor file of an older shiftbn (version 2), whose checksum does not "
                         "cover its header (alpha, n_null, seed, layers): it is not read, since an edit there would "
                         "go unnoticed. Refit the monitor and save it again (shiftbn monitor --reference SITE "
                         "--save FILE --force, or DriftMonitor(...).save)")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: drift-monitor file version {header.get('version')!r} is not supported by this "
                         f"shiftbn (reads version {VERSION}); refit the monitor")
    return header, raw


def read_monitor(path: str | Path, model: nn.Module) -> tuple[SampleMoments, ATC | None, dict]:
    """Read a monitor file for ``model``: its per-sample moments, ATC fit and header, all validated."""
    from safetensors.numpy import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"monitor file not found: {path}")
    header, raw = _header(path)
    try:
        arrays = load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on corrupt files
        raise ValueError(f"{path} is corrupt ({type(e).__name__}); refit the monitor") from None
    if header.get("sha256") != _digest(header, arrays):
        raise ValueError(f"{path} failed its sha256 check: the header or the arrays were changed or damaged after "
                         "it was written; refit the monitor")
    problems = fingerprint_problems(check_fingerprint(header.get("model"), f"{path}'s model"),
                                    model_fingerprint(model))
    if problems:
        raise ValueError(f"{path} is a monitor of another model: {'; '.join(problems)}. Refit it with this model "
                         "(shiftbn monitor --reference SITE --save FILE), or load the model it came from")
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(k, str) for k in layers):
        raise ValueError(f"{path}: the header's layers must be a non-empty list of names")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{path}: the header's layers name a layer twice: {layers}")
    channels = {layer.name: layer.module.num_features for layer in bn_layers(model)}
    mean, sq, n = {}, {}, None
    for k in layers:
        name = split_site(k)[0]
        if name not in channels:
            raise ValueError(f"{path}: layer {k!r} is not a BN layer of this model (its BN layers: "
                             f"{list(channels)[:8]}); load the monitor with the model it was fitted for")
        for what, store in (("sample_mean", mean), ("sample_sq", sq)):
            a = arrays.get(f"{what}/{k}")
            if a is None or a.ndim != 2 or a.shape[1] != channels[name] or not np.isfinite(a).all():
                raise ValueError(f"{path}: {what}/{k} is missing, not (N, {channels[name]}) or not finite")
            if n is not None and len(a) != n:
                raise ValueError(f"{path}: {what}/{k} has {len(a)} samples, other layers {n}")
            n = len(a)
            store[k] = a.astype(np.float64)
        if (sq[k] < 0).any():
            raise ValueError(f"{path}: sample_sq/{k} holds negative means of squares")
        for what in ("reference_mean", "reference_var"):
            a = arrays.get(f"{what}/{k}")
            if a is None or a.shape != (channels[name],) or not np.isfinite(a).all() or (
                    what == "reference_var" and (a < 0).any()):
                raise ValueError(f"{path}: {what}/{k} is missing, not ({channels[name]},), not finite or negative")
    extra = sorted(set(arrays) - {f"{kind}/{k}" for kind in _KINDS for k in layers})
    if extra:
        raise ValueError(f"{path}: arrays {extra[:4]} belong to no layer of its header")
    _check_int(header, "n_reference", path, low=2)
    if header["n_reference"] != n:
        raise ValueError(f"{path}: the header's n_reference {header['n_reference']} disagrees with its {n} samples")
    _check_int(header, "n_null", path, low=20)
    _check_int(header, "seed", path, low=0)
    if not isinstance(header.get("alpha"), float) or not 0 < header["alpha"] < 1:
        raise ValueError(f"{path}: header alpha must lie in (0, 1), got {header.get('alpha')!r}")
    atc = _atc(header.get("atc"), path)
    if atc is not None and atc.n != n:
        raise ValueError(f"{path}: the header's atc was fitted on {atc.n} samples, the reference holds {n}")
    moments = SampleMoments(mean, sq, {k: i for i, k in enumerate(layers)}, np.zeros((n, 0), np.float32))
    return moments, atc, header


def _check_int(header: dict, key: str, path: Path, *, low: int) -> None:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{path}: header {key} must be a whole number >= {low}, got {value!r}")


def _atc(d, path: Path) -> ATC | None:
    if d is None:
        return None
    fields = {"threshold": float, "score": str, "accuracy": float, "n": int}
    if not isinstance(d, dict) or set(d) != set(fields) or isinstance(d["n"], bool) or any(
            not isinstance(d[k], kind) for k, kind in fields.items() if kind is not float) or any(
            isinstance(d[k], bool) or not isinstance(d[k], (int, float)) for k in ("threshold", "accuracy")):
        raise ValueError(f"{path}: the header's atc entry is malformed: {d!r}")
    atc = ATC(float(d["threshold"]), d["score"], float(d["accuracy"]), d["n"])
    if atc.score not in ATC_SCORES or not math.isfinite(atc.threshold) or not 0 <= atc.accuracy <= 1 or atc.n < 1:
        raise ValueError(f"{path}: the header's atc entry is out of range: {d!r}")
    return atc
