"""Population BN parameters (the EMA in the buffers, prior-weighted mixes): loadable, never merged."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shiftbn.bn.moments import BNStats, LayerMap, as_vector, brief_repr, check_moments


@dataclass(frozen=True)
class Population:
    """Population parameters of one BN layer: per-channel ``mean`` and ``var`` (C,) float64.

    Why: unlike ``Moments`` there is no count behind them (an EMA, a prior-weighted mix), so
    they load into BN buffers but never merge.

    Args:
        mean: (C,) float64 per-channel mean.
        var: (C,) float64 per-channel variance.

    Returns:
        A frozen ``Population``.

    Example:
        >>> p = Population(np.zeros(3), np.ones(3))
        >>> p.channels
        3
    """

    mean: np.ndarray
    var: np.ndarray

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """These parameters as plain JSON-ready values.

        Why: statistics files store plain lists, readable without shiftbn.

        Args:
            None.

        Returns:
            ``{"mean": [C floats], "var": [C floats]}``.

        Example:
            >>> Population(np.array([0.5]), np.array([2.0])).to_dict()
            {'mean': [0.5], 'var': [2.0]}
        """
        return {"mean": self.mean.tolist(), "var": self.var.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "population") -> Population:
        """Read ``to_dict`` output, validated.

        Why: a file must not broadcast or load NaN silently.

        Args:
            d: a mapping with ``mean`` and ``var``.
            where: names the layer in error messages (default ``"population"``).

        Returns:
            ``Population`` with float64 arrays.

        Raises:
            ValueError: ``mean``/``var`` are not finite 1-D arrays of one length with ``var >= 0``.

        Example:
            >>> Population.from_dict({"mean": [0.5], "var": [2.0]}).var.tolist()
            [2.0]
        """
        if not isinstance(d, Mapping) or not {"mean", "var"} <= set(d):
            raise ValueError(f"{where}: expected a mapping with keys mean, var; got {brief_repr(d)}")
        mean, var = as_vector(d["mean"], f"{where}: mean"), as_vector(d["var"], f"{where}: var")
        check_moments(mean, var, where)
        return cls(mean, var)


@dataclass
class PopulationStats(LayerMap):
    """Population BN parameters per layer: layer name -> ``Population`` (``.mean``, ``.var``).

    Why: the EMA in the buffers (``buffer_stats``) and prior-weighted mixes (``mix_stats``) are
    parameters, not moments of a sample; this type has no ``merge`` and ``BNStats.merge`` refuses it,
    so they cannot be pooled as if they were one sample. ``num_samples``: samples behind the
    statistics where that is meaningful, else ``None``. Loadable with ``use_stats``/``load_stats``.

    Args:
        layers: layer name -> ``Population`` (default empty).
        num_samples: samples behind the statistics, or ``None`` (default).

    Returns:
        A ``PopulationStats``: ``stats[name]`` is that layer's ``Population``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> ema = buffer_stats(model)  # the running statistics: a PopulationStats
        >>> type(ema).__name__, ema["1"].var.tolist()
        ('PopulationStats', [1.0, 1.0, 1.0])
    """

    layers: dict[str, Population] = field(default_factory=dict)
    num_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """These parameters as plain JSON-ready values.

        Why: statistics files store plain lists, readable without shiftbn.

        Args:
            None.

        Returns:
            ``{"num_samples": int or None, "layers": {name: Population.to_dict()}}``.

        Example:
            >>> PopulationStats({"bn": Population(np.array([0.5]), np.array([2.0]))}).to_dict()
            {'num_samples': None, 'layers': {'bn': {'mean': [0.5], 'var': [2.0]}}}
        """
        return {"num_samples": self.num_samples, "layers": {k: p.to_dict() for k, p in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PopulationStats:
        """Read ``to_dict`` output; every layer validated as in ``Population.from_dict``.

        Why: a file must not load NaN or negative variances silently.

        Args:
            d: a mapping with ``layers`` (and ``num_samples``, default None).

        Returns:
            ``PopulationStats``.

        Raises:
            ValueError: no ``layers`` mapping, a bad ``num_samples`` or a bad layer (named).

        Example:
            >>> PopulationStats.from_dict({"layers": {"bn": {"mean": [0.5], "var": [2.0]}}})["bn"].mean.tolist()
            [0.5]
        """
        layers = d.get("layers") if isinstance(d, Mapping) else None
        if not isinstance(layers, Mapping):
            raise ValueError(f"population statistics need a 'layers' mapping, got {brief_repr(d)}")
        n = d.get("num_samples")
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise ValueError(f"num_samples must be an integer >= 0 or None, got {n!r}")
        return cls({k: Population.from_dict(v, f"layer {k!r}") for k, v in layers.items()},
                   None if n is None else int(n))

    def to_frame(self) -> pd.DataFrame:
        """The parameters as a tidy table, one row per (layer, channel).

        Why: plots and comparisons start from a DataFrame (STYLE rule 3).

        Args:
            None.

        Returns:
            A ``pandas.DataFrame`` with columns ``layer, channel, mean, var``.

        Example:
            >>> PopulationStats({"bn": Population(np.array([0.5]), np.array([2.0]))}).to_frame()
              layer  channel  mean  var
            0    bn        0   0.5  2.0
        """
        frames = [pd.DataFrame({"layer": k, "channel": np.arange(p.channels), "mean": p.mean, "var": p.var})
                  for k, p in self.layers.items()]
        cols = ["layer", "channel", "mean", "var"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def mix_stats(a: BNStats | PopulationStats, b: BNStats | PopulationStats, weight_a: float) -> PopulationStats:
    """Per layer, ``weight_a * a + (1 - weight_a) * b`` for means and for variances.

    Why: prior-weighted adaptation (Schneider et al. 2020) mixes source and target statistics.

    Args:
        a: ``BNStats`` or ``PopulationStats`` (e.g. the source's).
        b: ``BNStats`` or ``PopulationStats`` (e.g. the target batch's), same channels per layer.
        weight_a: the weight of ``a``, in [0, 1].

    Returns:
        ``PopulationStats`` (``num_samples`` None) over the layers present in both: population
        parameters to load, not a sample to merge further.

    Raises:
        TypeError: ``a`` or ``b`` of another type.
        ValueError: ``weight_a`` outside [0, 1], or a layer with different channel counts.

    Example:
        >>> a = PopulationStats({"bn": Population(np.array([0.0]), np.array([1.0]))})
        >>> b = PopulationStats({"bn": Population(np.array([4.0]), np.array([3.0]))})
        >>> mixed = mix_stats(a, b, weight_a=0.75)
        >>> mixed["bn"].mean.tolist(), mixed["bn"].var.tolist()
        ([1.0], [1.5])
    """
    for what, s in (("a", a), ("b", b)):
        if not isinstance(s, (BNStats, PopulationStats)):
            raise TypeError(f"mix_stats: {what} must be BNStats or PopulationStats, got {type(s).__name__}")
    if isinstance(weight_a, bool) or not isinstance(weight_a, numbers.Real) or not 0.0 <= weight_a <= 1.0:
        raise ValueError(f"weight_a must lie in [0, 1], got {weight_a}")
    out = {}
    for k, mb in b.layers.items():
        ma = a.layers.get(k)
        if ma is None:
            continue
        if ma.channels != mb.channels:
            raise ValueError(f"mix_stats: layer {k!r} has {ma.channels} channels in a but {mb.channels} in b")
        out[k] = Population(weight_a * ma.mean + (1 - weight_a) * mb.mean, weight_a * ma.var + (1 - weight_a) * mb.var)
    return PopulationStats(out)
