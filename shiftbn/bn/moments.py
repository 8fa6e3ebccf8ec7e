"""Exact per-channel moments: count, mean and M2 in float64, merged with Chan's parallel formula."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch


@dataclass(frozen=True)
class Moments:
    """Moments of one BN layer's input per channel.

    ``count``: values per channel (samples x spatial positions); ``mean``, ``m2`` (C,) float64,
    ``m2`` = sum of squared deviations from the mean. ``var`` is the population variance m2/count.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """Population (biased) variance per channel, float64 (C,)."""
        return self.m2 / max(self.count, 1)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def merge(self, other: Moments) -> Moments:
        """Exact moments of the union of both sets of values (Chan et al. 1979)."""
        if not isinstance(other, Moments):
            raise TypeError(
                f"only Moments merge with Moments, got {type(other).__name__}; population parameters "
                "(Population, from buffer_stats or mix_stats) are no sample and cannot be merged"
            )
        mean, m2, n = _chan(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return Moments(n, mean, m2)

    def to_dict(self) -> dict[str, Any]:
        return {"count": int(self.count), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "moments") -> Moments:
        """Read ``to_dict`` output, validated (``where`` names the layer in error messages).

        Raises ``ValueError`` unless ``count`` is a positive integer and ``mean``, ``m2`` are finite
        1-D arrays of one length with ``m2 >= 0``: a file must not broadcast or load NaN silently.
        """
        if not isinstance(d, Mapping) or not {"count", "mean", "m2"} <= set(d):
            raise ValueError(f"{where}: expected a mapping with keys count, mean, m2; got {brief_repr(d)}")
        count = d["count"]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(f"{where}: count must be a positive integer, got {count!r}")
        mean = as_vector(d["mean"], f"{where}: mean")
        m2 = as_vector(d["m2"], f"{where}: m2")
        check_moments(mean, m2, where, name="m2")
        return cls(int(count), mean, m2)


def brief_repr(x: Any) -> str:
    """``repr(x)`` cut to 80 characters, for error messages."""
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def as_vector(values: Any, what: str) -> np.ndarray:
    """``values`` as a float64 array, else ``ValueError`` naming ``what``."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of numbers, got {brief_repr(values)}") from None


def check_moments(mean: np.ndarray, second: np.ndarray, where: str, *, name: str = "var",
                  channels: int | None = None) -> None:
    """Raise ``ValueError`` unless ``mean`` and ``second`` (var or m2, called ``name``) are finite 1-D
    arrays of one length (``channels`` when given) with ``second >= 0``; ``where`` names the layer.
    """
    for what, a in (("mean", mean), (name, second)):
        if a.ndim != 1 or len(a) == 0:
            raise ValueError(f"{where}: {what} must be a non-empty 1-D array (one value per channel), "
                             f"got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: {what} holds NaN or Inf at channel(s) "
                             f"{np.flatnonzero(~np.isfinite(a))[:8].tolist()}")
    if len(mean) != len(second):
        raise ValueError(f"{where}: mean has {len(mean)} channels but {name} has {len(second)}")
    if channels is not None and len(mean) != channels:
        raise ValueError(f"{where}: the layer has {channels} channels but its statistics have {len(mean)}")
    if np.any(second < 0):
        raise ValueError(f"{where}: {name} must be >= 0, negative at channel(s) "
                         f"{np.flatnonzero(second < 0)[:8].tolist()}")


def _chan(na, ma, m2a, nb, mb, m2b):
    """Chan's merge; works on numpy arrays and torch tensors alike."""
    n = na + nb
    if na == 0:
        return mb, m2b, n
    if nb == 0:
        return ma, m2a, n
    delta = mb - ma
    return ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n), n


def batch_moments(x: torch.Tensor, workspace: Workspace | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean (C,) and M2 (C,) of a BN input (N, C, *) over all axes but 1, in float64.

    Two-pass in float64 on a private copy, so inputs with a large offset (1e4) stay exact. A reused
    ``workspace`` for that copy avoids a fresh allocation (and its page faults) per call.
    """
    count = x.numel() // x.shape[1]
    if workspace is not None:
        xd = workspace.take(x)
    else:
        xd = x.detach().to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    xd = xd.view(x.shape[0], x.shape[1], -1)  # contiguous copy: (N, C, L); summing L then N is ~10% faster
    mean = xd.sum(2).sum(0) / count
    xd.sub_(mean.view(1, -1, 1))
    # sum of squares per (sample, channel) in one read (no squared copy), then over samples
    return count, mean, torch.linalg.vector_norm(xd, 2, dim=2).square_().sum(0)


class Workspace:
    """One growing float64 buffer, shared by successive ``batch_moments`` calls on a device."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A float64 copy of ``x`` in the shared buffer (valid until the next call)."""
        n = x.numel()
        if self._buf is None or self._buf.numel() < n or self._buf.device != x.device:
            self._buf = torch.empty(n, dtype=torch.float64, device=x.device)
        view = self._buf[:n].view(x.shape)
        view.copy_(x.detach())
        return view


class LayerMap(Mapping):
    """A read-only mapping over a ``layers`` dict (layer name -> per-layer statistics), with errors
    that list the layers there are."""

    layers: dict

    def __getitem__(self, name: str):
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no statistics for layer {name!r}; layers: {list(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class BNStats(LayerMap):
    """Statistics of every BN layer for one set of samples: layer name -> ``Moments``.

    A module called several times per forward has one entry per call site, ``"<name>@<k>"`` for
    the k-th call (0-based, see ``site_key``), plus the merged entry under ``"<name>"``.
    ``num_samples``: samples seen.
    """

    layers: dict[str, Moments] = field(default_factory=dict)
    num_samples: int = 0

    def merge(self, other: BNStats) -> BNStats:
        """Exact statistics of both sample sets together (layers present in either).

        Raises ``TypeError`` for anything but ``BNStats`` (``PopulationStats`` holds no sample).
        """
        _require_sample(other, "BNStats.merge")
        names = list(self.layers) + [k for k in other.layers if k not in self.layers]
        merged = {}
        for k in names:
            a, b = self.layers.get(k), other.layers.get(k)
            merged[k] = a.merge(b) if a is not None and b is not None else (a or b)
        return BNStats(merged, self.num_samples + other.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": int(self.num_samples), "layers": {k: m.to_dict() for k, m in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> BNStats:
        """Read ``to_dict`` output; every layer validated as in ``Moments.from_dict`` (``where``: a
        prefix for messages, e.g. the source)."""
        layers = d.get("layers") if isinstance(d, Mapping) else None
        if not isinstance(layers, Mapping):
            raise ValueError(f"{where}BN statistics need a 'layers' mapping, got {brief_repr(d)}")
        n = d.get("num_samples", 0)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{where}num_samples must be an integer >= 0, got {n!r}")
        return cls({k: Moments.from_dict(v, f"{where}layer {k!r}") for k, v in layers.items()}, int(n))

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, channel) with columns ``layer, channel, count, mean, var``."""
        frames = [
            pd.DataFrame({"layer": k, "channel": np.arange(m.channels), "count": m.count,
                          "mean": m.mean, "var": m.var})
            for k, m in self.layers.items()
        ]
        cols = ["layer", "channel", "count", "mean", "var"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _require_sample(stats: Any, verb: str) -> None:
    """``TypeError`` unless ``stats`` are sample moments (``BNStats``): population parameters
    (``PopulationStats``) have no count, so merging them would be silently wrong."""
    if not isinstance(stats, BNStats):
        raise TypeError(
            f"{verb} merges sample moments (BNStats), got {type(stats).__name__}; population parameters "
            "(PopulationStats from buffer_stats or mix_stats) have no sample count and cannot be merged: "
            "merge the BNStats they came from, or load them with use_stats/load_stats"
        )


POOLED = "pooled"


@dataclass
class SourceStats(Mapping):
    """Per-source statistics: source name -> ``BNStats``; ``pooled()`` merges all sources exactly.

    ``mode``: the collection mode; ``passes``: passes over the data it took (sequential mode).
    """

    sources: dict[str, BNStats] = field(default_factory=dict)
    mode: str = "batch"
    passes: int = 1

    def __getitem__(self, name: str) -> BNStats:
        key = str(name)
        if key not in self.sources:
            raise KeyError(f"no statistics for source {name!r}; sources: {list(self.sources)}")
        return self.sources[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def pooled(self) -> BNStats:
        """Exact moments of the union of all sources (each seen in its own batches).

        Raises ``TypeError`` when a source holds ``PopulationStats`` (no sample to pool).
        """
        out = BNStats()
        for name, s in self.sources.items():
            _require_sample(s, f"SourceStats.pooled (source {name!r})")
            out = out.merge(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "sources": {k: v.to_dict() for k, v in self.sources.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceStats:
        """Read ``to_dict`` output; every source's layers validated (messages name source and layer)."""
        sources = d.get("sources") if isinstance(d, Mapping) else None
        if not isinstance(sources, Mapping):
            raise ValueError(f"per-source statistics need a 'sources' mapping, got {brief_repr(d)}")
        return cls({k: BNStats.from_dict(v, f"source {k!r}: ") for k, v in sources.items()}, d.get("mode", "batch"))

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``source, layer, channel, count, mean, var``."""
        frames = [v.to_frame().assign(source=k) for k, v in self.sources.items()]
        df = pd.concat(frames, ignore_index=True)
        return df[["source", "layer", "channel", "count", "mean", "var"]]
