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

    Unlike ``Moments`` there is no count behind them (an EMA, a prior-weighted mix): nothing to merge.
    """

    mean: np.ndarray
    var: np.ndarray

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "population") -> Population:
        """Read ``to_dict`` output; finite 1-D ``mean``, ``var >= 0`` of one length, else ``ValueError``."""
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
    """

    layers: dict[str, Population] = field(default_factory=dict)
    num_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "layers": {k: p.to_dict() for k, p in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PopulationStats:
        """Read ``to_dict`` output; every layer validated as in ``Population.from_dict``."""
        layers = d.get("layers") if isinstance(d, Mapping) else None
        if not isinstance(layers, Mapping):
            raise ValueError(f"population statistics need a 'layers' mapping, got {brief_repr(d)}")
        n = d.get("num_samples")
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise ValueError(f"num_samples must be an integer >= 0 or None, got {n!r}")
        return cls({k: Population.from_dict(v, f"layer {k!r}") for k, v in layers.items()},
                   None if n is None else int(n))

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, channel) with columns ``layer, channel, mean, var``."""
        frames = [pd.DataFrame({"layer": k, "channel": np.arange(p.channels), "mean": p.mean, "var": p.var})
                  for k, p in self.layers.items()]
        cols = ["layer", "channel", "mean", "var"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def mix_stats(a: BNStats | PopulationStats, b: BNStats | PopulationStats, weight_a: float) -> PopulationStats:
    """Per layer, ``weight_a * a + (1 - weight_a) * b`` for means and for variances.

    Why: prior-weighted adaptation (Schneider et al. 2020) mixes source and target statistics.
    Layers present in both; ``a``, ``b``: ``BNStats`` or ``PopulationStats``. The result holds
    population parameters (``PopulationStats``, ``num_samples`` None), not a sample to merge further.
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
