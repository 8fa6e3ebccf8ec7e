"""Exact per-channel moments: count, mean and M2 in float64, merged with Chan's parallel formula."""

from __future__ import annotations

import math
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

    Why: count, mean and M2 in float64 merge exactly (Chan et al. 1979), whatever the batch
    split; E[x^2] - E[x]^2 in float32 does not.

    Args:
        count: values per channel (samples x spatial positions).
        mean: (C,) float64 per-channel mean.
        m2: (C,) float64 per-channel sum of squared deviations from the mean.

    Returns:
        A frozen ``Moments``; ``var`` is the population variance ``m2 / count`` (C,).

    Example:
        >>> m = Moments(4, np.array([1.0]), np.array([8.0]))
        >>> m.var.tolist(), m.channels
        ([2.0], 1)
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
        """Exact moments of the union of both sets of values (Chan et al. 1979).

        Why: statistics of batches, ranks or sources combine without revisiting the data.

        Args:
            other: the ``Moments`` of the other set (same channels).

        Returns:
            A new ``Moments`` with ``count = self.count + other.count``.

        Raises:
            TypeError: ``other`` is not ``Moments`` (e.g. a ``Population``, which has no count).

        Example:
            >>> a = Moments(2, np.array([0.0]), np.array([2.0]))  # values -1, 1
            >>> b = Moments(2, np.array([4.0]), np.array([2.0]))  # values 3, 5
            >>> ab = a.merge(b)
            >>> ab.count, ab.mean.tolist(), ab.var.tolist()
            (4, [2.0], [5.0])
        """
        if not isinstance(other, Moments):
            raise TypeError(
                f"only Moments merge with Moments, got {type(other).__name__}; population parameters "
                "(Population, from buffer_stats or mix_stats) are no sample and cannot be merged"
            )
        mean, m2, n = _chan(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return Moments(n, mean, m2)

    def to_dict(self) -> dict[str, Any]:
        """These moments as plain JSON-ready values.

        Why: statistics files store plain lists, readable without shiftbn.

        Args:
            None.

        Returns:
            ``{"count": int, "mean": [C floats], "m2": [C floats]}``.

        Example:
            >>> Moments(4, np.array([1.0]), np.array([8.0])).to_dict()
            {'count': 4, 'mean': [1.0], 'm2': [8.0]}
        """
        return {"count": int(self.count), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "moments") -> Moments:
        """Read ``to_dict`` output, validated.

        Why: a file must not broadcast or load NaN silently.

        Args:
            d: a mapping with ``count``, ``mean``, ``m2``.
            where: names the layer in error messages (default ``"moments"``).

        Returns:
            ``Moments`` with float64 arrays.

        Raises:
            ValueError: ``count`` is not a positive integer, or ``mean``/``m2`` are not finite 1-D
                arrays of one length with ``m2 >= 0``.

        Example:
            >>> Moments.from_dict({"count": 4, "mean": [1.0], "m2": [8.0]}).var.tolist()
            [2.0]
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
    """Count, mean and M2 of a BN input over all axes but 1, in float64.

    Why: two passes in float64 on a private copy keep inputs with a large offset (1e4) exact. A
    reused ``workspace`` for that copy avoids a fresh allocation (and its page faults) per call.

    Args:
        x: a BN input (N, C, *), any float dtype and device; not modified.
        workspace: a ``Workspace`` to reuse for the float64 copy (default: a fresh copy).

    Returns:
        ``(count, mean, m2)``: int values per channel, and (C,) float64 tensors on ``x``'s device.

    Example:
        >>> count, mean, m2 = batch_moments(torch.tensor([[1.0, 10.0], [3.0, 10.0]]))
        >>> count, mean.tolist(), m2.tolist()
        (2, [2.0, 10.0], [2.0, 0.0])
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


def fast_batch_moments(x: torch.Tensor, workspace: Workspace | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and M2 of a BN input over all axes but 1, as ``batch_moments``, from float32 passes.

    Why: per-batch strategies (``prior:N``) need every batch's moments in every forward; three
    float32 passes (no float64 copy) cost about half of ``batch_moments`` and as much as BN's own
    statistics. Per (sample, channel) float32 sums give the mean in float64; M2 comes from the float32
    deviations around that mean rounded to float32, corrected to the exact mean: within ~1e-7
    (relative) of ``batch_moments``, also for inputs with a large offset (1e4). Inputs of any other
    dtype (float64, float16, bfloat16) go through ``batch_moments``.

    Args:
        x: a BN input (N, C, *), any float dtype and device; not modified.
        workspace: a ``Workspace`` whose buffers are reused for the deviations (default: fresh ones).

    Returns:
        ``(count, mean, m2)``: int values per channel, and (C,) float64 tensors on ``x``'s device.

    Example:
        >>> count, mean, m2 = fast_batch_moments(torch.tensor([[1.0, 10.0], [3.0, 10.0]]))
        >>> count, mean.tolist(), m2.tolist()
        (2, [2.0, 10.0], [2.0, 0.0])
    """
    if x.dtype != torch.float32 or x.dim() < 2:
        return batch_moments(x, workspace)
    n, c = x.shape[0], x.shape[1]
    count = x.numel() // c
    xv = x.detach().reshape(n, c, -1)
    mean = xv.sum(2).double().sum(0) / count
    rounded = mean.float()
    dev = workspace.scratch(xv.shape, torch.float32, x.device) if workspace is not None else torch.empty_like(xv)
    torch.sub(xv, rounded.view(1, -1, 1), out=dev)
    # sum((x - r)^2) = M2 + count * (mean - r)^2 for the rounded mean r
    squares = torch.linalg.vector_norm(dev, 2, dim=2).double().square_().sum(0)
    return count, mean, (squares - count * (mean - rounded.double()).square_()).clamp_min_(0)


class Workspace:
    """Growing buffers (one per dtype and device), shared by successive ``batch_moments`` calls."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def scratch(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in a reused buffer of ``dtype`` on ``device`` (valid until the
        next call for that dtype and device)."""
        n = math.prod(shape)
        buf = self._scratch.get((dtype, device))
        if buf is None or buf.numel() < n:
            buf = self._scratch[dtype, device] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

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

    Why: statistics of one set of samples, exact and mergeable; a read-only mapping over ``layers``.

    Args:
        layers: layer name -> ``Moments`` (default empty).
        num_samples: samples seen (default 0).

    Returns:
        A ``BNStats``: ``stats[name]`` is that layer's ``Moments`` (``KeyError`` lists the layers).

    Example:
        >>> stats = BNStats({"bn": Moments(4, np.array([1.0]), np.array([8.0]))}, num_samples=4)
        >>> list(stats), stats["bn"].var.tolist()
        (['bn'], [2.0])
    """

    layers: dict[str, Moments] = field(default_factory=dict)
    num_samples: int = 0

    def merge(self, other: BNStats) -> BNStats:
        """Exact statistics of both sample sets together (layers present in either).

        Why: merging moments is exact; averaging means and variances of unequal sets is not.

        Args:
            other: the ``BNStats`` of the other sample set.

        Returns:
            A new ``BNStats`` with ``num_samples`` summed; a layer in one set only is taken as is.

        Raises:
            TypeError: ``other`` is not ``BNStats`` (``PopulationStats`` holds no sample).

        Example:
            >>> a = BNStats({"bn": Moments(2, np.array([0.0]), np.array([2.0]))}, 2)
            >>> b = BNStats({"bn": Moments(2, np.array([4.0]), np.array([2.0]))}, 2)
            >>> ab = a.merge(b)
            >>> ab.num_samples, ab["bn"].var.tolist()
            (4, [5.0])
        """
        _require_sample(other, "BNStats.merge")
        names = list(self.layers) + [k for k in other.layers if k not in self.layers]
        merged = {}
        for k in names:
            a, b = self.layers.get(k), other.layers.get(k)
            merged[k] = a.merge(b) if a is not None and b is not None else (a or b)
        return BNStats(merged, self.num_samples + other.num_samples)

    def to_dict(self) -> dict[str, Any]:
        """These statistics as plain JSON-ready values.

        Why: statistics files store plain lists, readable without shiftbn.

        Args:
            None.

        Returns:
            ``{"num_samples": int, "layers": {name: Moments.to_dict()}}``.

        Example:
            >>> BNStats({"bn": Moments(4, np.array([1.0]), np.array([8.0]))}, 4).to_dict()
            {'num_samples': 4, 'layers': {'bn': {'count': 4, 'mean': [1.0], 'm2': [8.0]}}}
        """
        return {"num_samples": int(self.num_samples), "layers": {k: m.to_dict() for k, m in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> BNStats:
        """Read ``to_dict`` output; every layer validated as in ``Moments.from_dict``.

        Why: a file must not load NaN, negative variances or mismatched channels silently.

        Args:
            d: a mapping with ``layers`` (and ``num_samples``, default 0).
            where: a prefix for error messages, e.g. the source (default none).

        Returns:
            ``BNStats``.

        Raises:
            ValueError: no ``layers`` mapping, a bad ``num_samples`` or a bad layer (named).

        Example:
            >>> d = {"num_samples": 4, "layers": {"bn": {"count": 4, "mean": [1.0], "m2": [8.0]}}}
            >>> BNStats.from_dict(d)["bn"].count
            4
        """
        layers = d.get("layers") if isinstance(d, Mapping) else None
        if not isinstance(layers, Mapping):
            raise ValueError(f"{where}BN statistics need a 'layers' mapping, got {brief_repr(d)}")
        n = d.get("num_samples", 0)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{where}num_samples must be an integer >= 0, got {n!r}")
        return cls({k: Moments.from_dict(v, f"{where}layer {k!r}") for k, v in layers.items()}, int(n))

    def to_frame(self) -> pd.DataFrame:
        """The statistics as a tidy table, one row per (layer, channel).

        Why: plots and comparisons start from a DataFrame (STYLE rule 3).

        Args:
            None.

        Returns:
            A ``pandas.DataFrame`` with columns ``layer, channel, count, mean, var``.

        Example:
            >>> BNStats({"bn": Moments(4, np.array([1.0, 2.0]), np.array([8.0, 0.0]))}).to_frame()
              layer  channel  count  mean  var
            0    bn        0      4   1.0  2.0
            1    bn        1      4   2.0  0.0
        """
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

    Why: per-source statistics are what AdaBN, DSBN and the shift profile compare.

    Args:
        sources: source name -> ``BNStats`` (default empty).
        mode: the collection mode (``"batch"``, ``"sequential"`` or ``"eval"``).
        passes: passes over the data the collection took (sequential mode; default 1).

    Returns:
        A ``SourceStats``: ``stats[name]`` is that source's ``BNStats`` (``KeyError`` lists them).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> stats = collect_stats(model, sb.load("blobs-labs", n=60, n_features=4), progress=False)
        >>> list(stats), stats["lab_0"]["1"].mean.shape
        (['lab_0', 'lab_1', 'lab_2', 'lab_3'], (3,))
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

        Why: the pooled reference of ``stats_shift`` and PreciseBN's single population.

        Args:
            None.

        Returns:
            ``BNStats`` whose ``num_samples`` is the sum over sources.

        Raises:
            TypeError: a source holds ``PopulationStats`` (no sample to pool).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            >>> stats = collect_stats(model, sb.load("blobs-labs", n=60, n_features=4), progress=False)
            >>> stats.pooled().num_samples, stats.pooled()["1"].count
            (60, 60)
        """
        out = BNStats()
        for name, s in self.sources.items():
            _require_sample(s, f"SourceStats.pooled (source {name!r})")
            out = out.merge(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        """These statistics as plain JSON-ready values.

        Why: statistics files store plain lists, readable without shiftbn.

        Args:
            None.

        Returns:
            ``{"mode": str, "sources": {name: BNStats.to_dict()}}``.

        Example:
            >>> bn = BNStats({"bn": Moments(4, np.array([1.0]), np.array([8.0]))}, 4)
            >>> SourceStats({"lab_a": bn}).to_dict()["sources"]["lab_a"]["num_samples"]
            4
        """
        return {"mode": self.mode, "sources": {k: v.to_dict() for k, v in self.sources.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceStats:
        """Read ``to_dict`` output; every source's layers validated.

        Why: a file must not load bad statistics silently; messages name the source and layer.

        Args:
            d: a mapping with ``sources`` (and ``mode``, default ``"batch"``).

        Returns:
            ``SourceStats``.

        Raises:
            ValueError: no ``sources`` mapping, or a bad source or layer (named).

        Example:
            >>> bn = BNStats({"bn": Moments(4, np.array([1.0]), np.array([8.0]))}, 4)
            >>> SourceStats.from_dict(SourceStats({"lab_a": bn}).to_dict())["lab_a"]["bn"].var.tolist()
            [2.0]
        """
        sources = d.get("sources") if isinstance(d, Mapping) else None
        if not isinstance(sources, Mapping):
            raise ValueError(f"per-source statistics need a 'sources' mapping, got {brief_repr(d)}")
        return cls({k: BNStats.from_dict(v, f"source {k!r}: ") for k, v in sources.items()}, d.get("mode", "batch"))

    def to_frame(self) -> pd.DataFrame:
        """The statistics as a tidy table, one row per (source, layer, channel).

        Why: per-source comparisons and plots start from a DataFrame (STYLE rule 3).

        Args:
            None.

        Returns:
            A ``pandas.DataFrame`` with columns ``source, layer, channel, count, mean, var``.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            >>> stats = collect_stats(model, sb.load("blobs-labs", n=60, n_features=4), progress=False)
            >>> df = stats.to_frame()
            >>> len(df), list(df.columns)[:3]
            (12, ['source', 'layer', 'channel'])
        """
        frames = [v.to_frame().assign(source=k) for k, v in self.sources.items()]
        df = pd.concat(frames, ignore_index=True)
        return df[["source", "layer", "channel", "count", "mean", "var"]]
