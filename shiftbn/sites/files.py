"""Statistics files for federated use: exact per-site moments written where the data lives, merged anywhere.

Why: sites that may not move images can still share BN moments (count, mean, M2 per channel), and
Chan's merge pools them exactly (FedBN, SiloBN). The file is safetensors (float64 arrays) with a JSON
header: format name and version, shiftbn version, per-source sample counts, the model's fingerprint
and a sha256 over header and arrays. Nothing is ever unpickled, so a file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from shiftbn._io import atomic_write_bytes
from shiftbn._safefile import META_KEY, read_shiftbn_file
from shiftbn._version import __version__
from shiftbn.bn.collect import COLLECT_MODES
from shiftbn.bn.moments import POOLED, BNStats, Moments, SourceStats, check_moments
from shiftbn.bn.sites import split_site
from shiftbn.sites.fingerprint import bn_channels, check_fingerprint, fingerprint_problems, model_fingerprint

FORMAT = "shiftbn.stats"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StatsHeader:
    """What a statistics file says about itself (validated, checksum included).

    ``sources``: source name -> samples; ``fingerprint``: the model's (``model_fingerprint``);
    ``mode``/``passes``: as in ``SourceStats``; ``min_count``: the floor it was exported with (None:
    none); ``extra``: the writer's JSON metadata.
    """

    format_version: int
    shiftbn_version: str
    mode: str
    passes: int
    sources: dict[str, int]
    fingerprint: dict[str, Any]
    min_count: int | None
    extra: Any


def save_stats(stats: SourceStats | BNStats, path: str | Path, *, model: nn.Module | Mapping[str, Any],
               min_count: int | None = None, extra: Any = None, source: str | None = None) -> Path:
    """Write exact per-source BN moments (count, mean, M2 in float64) as a statistics file; returns ``path``.

    Why: the file travels instead of the images; ``read_stats``/``merge_stats`` pool files exactly.
    ``stats``: a ``SourceStats`` (every source kept under its name) or a ``BNStats`` (stored as source
    ``source``, default ``"pooled"``); ``source`` also renames the single source of a ``SourceStats``.
    ``model``: the model the statistics were collected with, or its fingerprint (``model_fingerprint``,
    ``read_stats_header(path).fingerprint``). ``min_count``: refuse (``ValueError``) when any source holds
    fewer samples. This is a floor against exporting the moments of a handful of patients, NOT
    differential privacy: moments of many samples can still leak about one (e.g. two exports that
    differ by one sample). ``extra``: JSON-serializable metadata stored in the header.
    The write is atomic: the file is the old one or the whole new one, never a part.
    """
    stats = _as_sources(stats, source)
    min_count = check_min_count(stats, min_count)
    fp = check_fingerprint(model, "model") if isinstance(model, Mapping) else model_fingerprint(model)
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serializable (dicts, lists, strings, finite numbers): {e}") from None
    header: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "shiftbn_version": __version__,
                              "mode": str(stats.mode), "passes": int(stats.passes), "fingerprint": fp,
                              "min_count": min_count, "extra": extra, "sources": []}
    tensors: dict[str, np.ndarray] = {}
    for i, (name, bn) in enumerate(stats.sources.items()):
        header["sources"].append({"name": name, "num_samples": int(bn.num_samples),
                                  "layers": [[k, int(m.count)] for k, m in bn.layers.items()]})
        for j, m in enumerate(bn.layers.values()):
            tensors[f"{i}/{j}/mean"] = np.ascontiguousarray(m.mean, dtype=np.float64)
            tensors[f"{i}/{j}/m2"] = np.ascontiguousarray(m.m2, dtype=np.float64)
    _decode(header, tensors, Path(path), f"cannot write {path}")  # what read_stats would refuse is never written
    header["sha256"] = _digest(header, tensors)
    from safetensors.numpy import save

    data = save(tensors, metadata={META_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"))})
    atomic_write_bytes(Path(path), data)
    return Path(path)


def check_min_count(stats: SourceStats, min_count: int | None, *, flag: str = "min_count") -> int | None:
    """``min_count`` as an int; ``ValueError`` when a source of ``stats`` holds fewer samples (nothing is
    exported then). ``flag`` names the option in messages."""
    if min_count is None:
        return None
    if isinstance(min_count, bool) or not isinstance(min_count, numbers.Integral) or min_count < 1:
        raise ValueError(f"{flag} must be a whole number of samples >= 1, got {min_count!r}")
    small = {k: v.num_samples for k, v in stats.sources.items() if v.num_samples < min_count}
    if small:
        raise ValueError(f"source(s) {small} hold fewer than {flag} {min_count} samples; their statistics are not "
                         "exported (a privacy floor): collect more samples or leave those sources out")
    return int(min_count)


def _as_sources(stats: Any, source: str | None) -> SourceStats:
    """``stats`` as a validated ``SourceStats`` of sample moments, renamed to ``source`` when given."""
    if source is not None and (not isinstance(source, str) or not source):
        raise ValueError(f"source must be a non-empty name, got {source!r}")
    if isinstance(stats, BNStats):
        stats = SourceStats({source or POOLED: stats})
    elif not isinstance(stats, SourceStats):
        raise TypeError(f"save_stats writes SourceStats or BNStats (from collect_stats), got {type(stats).__name__}")
    elif source is not None:
        if len(stats) != 1:
            raise ValueError(f"source={source!r} renames a single source, but the statistics hold {list(stats)}")
        stats = SourceStats({source: next(iter(stats.sources.values()))}, stats.mode, stats.passes)
    if not stats.sources:
        raise ValueError("the statistics hold no source; nothing to write")
    for name, bn in stats.sources.items():
        if not isinstance(bn, BNStats):
            raise TypeError(f"source {name!r} holds {type(bn).__name__}, not sample moments (BNStats): population "
                            "parameters have no counts and cannot be pooled, so they are not written")
        if bn.num_samples < 1 or not bn.layers:
            raise ValueError(f"source {name!r} holds no samples; nothing to write for it")
        for k, m in bn.layers.items():
            check_moments(np.asarray(m.mean), np.asarray(m.m2), f"source {name!r} layer {k!r}", name="m2")
    return stats


def _digest(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the header (without its own digest, canonical JSON) and every array's name and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True,
                        separators=(",", ":")).encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"\0{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def read_stats(path: str | Path, *, model: nn.Module | None = None) -> SourceStats:
    """The per-source statistics of a file written by ``save_stats`` (validated, checksum checked).

    ``model``: when given, statistics of another model are refused (``ValueError`` naming each
    difference: BN layer names, a layer's ``num_features``, which weight tensor differs; the BN
    running statistics are not part of the fingerprint, so a recalibrated model still matches).
    Raises ``ValueError`` for a file of another format or version, a truncated or changed file.
    """
    header, stats = _load(path)
    if model is not None:
        check_model(header, model, path)
    return stats


def read_stats_header(path: str | Path) -> StatsHeader:
    """The header of a statistics file (after the same checks as ``read_stats``)."""
    return _load(path)[0]


def check_model(header: StatsHeader, model: nn.Module | Mapping[str, Any], path: str | Path = "statistics") -> None:
    """``ValueError`` naming every difference between the file's model and ``model`` (or its fingerprint)."""
    actual = check_fingerprint(model, "model") if isinstance(model, Mapping) else model_fingerprint(model)
    problems = fingerprint_problems(header.fingerprint, actual)
    if problems:
        raise ValueError(f"{path} holds statistics of another model: {'; '.join(problems)}. Compute them with this "
                         "model and checkpoint (shiftbn stats ... --out SITE.stats), or load the model they came from")


def merge_stats(*sources: str | Path | SourceStats, model: nn.Module | None = None,
                duplicates: Literal["refuse", "merge"] = "refuse") -> SourceStats:
    """Pool statistics files (paths) and/or ``SourceStats`` exactly: one ``SourceStats`` with every source.

    Why: Chan's merge in float64 gives the moments of the union, so sites never pool images.
    ``.pooled()`` of the result is the union of all sources. Files must share one model fingerprint
    (and ``model``'s, when given) and one collection mode. A source name found in two inputs is
    refused by default (``duplicates="refuse"``): it is most often one site exported twice, which
    would count its samples twice; ``duplicates="merge"`` pools them (a site exporting shards).
    In-memory ``SourceStats`` carry no fingerprint and are trusted as they are.
    """
    if duplicates not in ("refuse", "merge"):
        raise ValueError(f"duplicates must be 'refuse' or 'merge', got {duplicates!r}")
    if not sources:
        raise ValueError("merge_stats needs at least one statistics file or SourceStats")
    if len(sources) == 1 and isinstance(sources[0], (list, tuple)):
        sources = tuple(sources[0])
    loaded: list[tuple[str, SourceStats, StatsHeader | None]] = []
    for item in sources:
        if isinstance(item, (str, Path)):
            header, st = _load(item)
            loaded.append((str(item), st, header))
        elif isinstance(item, SourceStats):
            loaded.append((f"SourceStats({list(item)})", item, None))
        else:
            raise TypeError(f"merge_stats takes paths of statistics files or SourceStats, got {type(item).__name__}"
                            + ("; wrap BNStats as SourceStats({'site': stats})" if isinstance(item, BNStats) else ""))
    _check_agree(loaded, model)
    out: dict[str, BNStats] = {}
    origin: dict[str, str] = {}
    for where, st, _ in loaded:
        for name, bn in st.sources.items():
            if name in out and duplicates == "refuse":
                raise ValueError(f"source {name!r} is in both {origin[name]} and {where}; one source exported "
                                 "twice would count its samples twice. Give each source its own name (shiftbn stats "
                                 "--source-name NAME), or pool shards of one source on purpose (duplicates='merge', "
                                 "shiftbn merge --merge-duplicates)")
            out[name] = out[name].merge(bn) if name in out else bn
            origin.setdefault(name, where)
    return SourceStats(out, loaded[0][1].mode, max(st.passes for _, st, _ in loaded))


def _check_agree(loaded: list, model: nn.Module | None) -> None:
    """One model fingerprint and one collection mode across the inputs (and ``model``'s)."""
    files = [(where, h) for where, _, h in loaded if h is not None]
    if model is not None:
        actual = model_fingerprint(model)  # hashed once for all files
        for where, h in files:
            check_model(h, actual, where)
    for where, h in files[1:]:
        problems = fingerprint_problems(files[0][1].fingerprint, h.fingerprint, first=files[0][0], second=where)
        if problems:
            raise ValueError(f"statistics of different models cannot be merged: {'; '.join(problems)}. Recompute "
                             "every site's statistics with one model and checkpoint")
    modes = {where: st.mode for where, st, _ in loaded}
    if len(set(modes.values())) > 1:
        raise ValueError(f"statistics collected in different modes cannot be merged: {modes}; collect every site's "
                         "with one --mode")


def _load(path: str | Path) -> tuple[StatsHeader, SourceStats]:
    """Parse, check and decode a statistics file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a statistics file (shiftbn stats ... --out SITE.stats writes one)")
    try:
        meta, data = read_shiftbn_file(path, f"{path} is not a shiftbn statistics file",
                                       "Write one with shiftbn stats ... --out SITE.stats or sb.save_stats")
    except FileNotFoundError:
        raise FileNotFoundError(f"statistics file not found: {path}") from None
    _check_format(meta, path)
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{path} is damaged or truncated ({e}); copy it again from the site") from None
    if meta.get("sha256") != _digest(meta, tensors):
        raise ValueError(f"{path} failed its checksum: it was changed or damaged after it was written; "
                         "copy it again from the site")
    return _decode(meta, tensors, path)


def _check_format(meta: dict[str, Any], path: Path) -> None:
    """Refuse a shiftbn file of another format or format version, saying which and what to do."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a shiftbn statistics file (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        fix = "upgrade shiftbn to read it" if newer else "export the statistics again with this shiftbn"
        raise ValueError(f"{path} has statistics format version {version!r} (written by shiftbn "
                         f"{meta.get('shiftbn_version')}); this shiftbn {__version__} reads version "
                         f"{FORMAT_VERSION}: {fix}")


def _decode(meta: dict[str, Any], tensors: dict[str, np.ndarray], path: Path,
            bad: str | None = None) -> tuple[StatsHeader, SourceStats]:
    """``StatsHeader`` and ``SourceStats`` from a checked header and its arrays, every field validated.

    Why: the checksum proves the file unchanged since it was written, not that its writer was shiftbn:
    a header edited and re-hashed must not pass either. So every layer must be a BN layer of the
    model in the file's fingerprint (``name`` or a call site ``name@k``), with that layer's channel
    count; counts and ``num_samples`` whole numbers >= 1, ``num_samples`` at most the values counted
    over its layers (every sample reaches a BN layer), at least ``min_count``; ``passes`` >= 1, a known mode.
    ``bad`` starts the error message (default "<path> is malformed").
    """
    bad = bad or f"{path} is malformed"
    try:
        fingerprint = check_fingerprint(meta["fingerprint"], f"{path}: fingerprint")
        channels = bn_channels(fingerprint)
        if meta["mode"] not in COLLECT_MODES:
            raise ValueError(f"mode {meta['mode']!r} is none of {list(COLLECT_MODES)}")
        passes = _count(meta["passes"], "passes")
        min_count = None if meta["min_count"] is None else _count(meta["min_count"], "min_count")
        if not isinstance(meta["sources"], list) or not meta["sources"]:
            raise ValueError("it holds no source")
        sources, used = {}, set()
        for i, s in enumerate(meta["sources"]):
            name = s["name"]
            if not isinstance(name, str) or not name or name in sources:
                raise ValueError(f"source name {name!r} is not a new, non-empty string")
            num_samples = _count(s["num_samples"], f"source {name!r}: num_samples")
            if not isinstance(s["layers"], list) or not s["layers"]:
                raise ValueError(f"source {name!r} holds no layer")
            layers = {}
            for j, (key, count) in enumerate(s["layers"]):
                where = f"source {name!r} layer {key!r}"
                if not isinstance(key, str) or key in layers:
                    raise ValueError(f"source {name!r}: layer key {key!r} is not a new string")
                layer = split_site(key)[0]
                if layer not in channels:
                    raise ValueError(f"{where} is no BN layer of the model in its fingerprint (BN layers "
                                     f"{list(channels)[:6]}{', ...' if len(channels) > 6 else ''})")
                names = (f"{i}/{j}/mean", f"{i}/{j}/m2")
                used.update(names)
                layers[key] = Moments.from_dict({"count": count, "mean": tensors[names[0]],
                                                 "m2": tensors[names[1]]}, where)
                if layers[key].channels != channels[layer]:
                    raise ValueError(f"{where} has {layers[key].channels} channels; the model's layer "
                                     f"{layer!r} has {channels[layer]}")
            counted = sum(m.count for m in layers.values())
            if num_samples > counted:
                raise ValueError(f"source {name!r}: num_samples {num_samples} exceeds the {counted} values its "
                                 "layers counted (each sample adds at least one value to a BN layer)")
            if min_count is not None and num_samples < min_count:
                raise ValueError(f"source {name!r}: {num_samples} samples, fewer than its min_count {min_count}")
            sources[name] = BNStats(layers, num_samples)
        if not isinstance(meta["shiftbn_version"], str):
            raise ValueError(f"shiftbn_version {meta['shiftbn_version']!r} is not a string")
        header = StatsHeader(FORMAT_VERSION, meta["shiftbn_version"], meta["mode"], passes,
                             {k: v.num_samples for k, v in sources.items()}, fingerprint, min_count, meta["extra"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{bad}: {e}") from None
    if set(tensors) != used:
        raise ValueError(f"{bad}: arrays {sorted(set(tensors) ^ used)[:4]} do not match its header")
    return header, SourceStats(sources, header.mode, header.passes)


def _count(value: Any, what: str) -> int:
    """``value`` if it is a whole number >= 1 (JSON: not a float, not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    return value
