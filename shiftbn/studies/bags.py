"""Bags of samples that share context: a per-bag nuisance and a class mix that differs between bags.

Why: the paper's leakage (Section 6) comes from samples normalized together that share context (the
region proposals of one image, the positive pairs of MoCo). A bag is that context at small scale:
its samples share an input offset drawn per bag, and its class mix leans to one half of the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shiftbn.data.arrays import ArrayDataset
from shiftbn.data.tagged import SourceTaggedDataset


def bag_ids(labels: np.ndarray, bag_size: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """The bag of every sample (N,) int64, ``-1`` for the few left out; every bag has ``bag_size`` samples.

    Each bag has a theme, one half of the classes; a sample joins a bag of its own half's theme with
    probability ``skew`` and of the other theme otherwise, so a bag holds about ``skew`` of its
    theme's classes (``skew = 0.5``: class mix independent of the bag). Within a theme, samples are
    shuffled and cut into bags; the remainder (< ``bag_size`` per theme) gets ``-1``.
    """
    labels = np.asarray(labels)
    if bag_size < 2:
        raise ValueError(f"bag_size must be >= 2 (BN needs two samples per bag), got {bag_size}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must lie in [0, 1], got {skew}")
    half = (labels >= (labels.max() + 1) / 2).astype(np.int64)
    theme = np.where(rng.random(len(labels)) < skew, half, 1 - half)
    out = np.full(len(labels), -1, dtype=np.int64)
    next_id = 0
    for t in (0, 1):
        members = rng.permutation(np.flatnonzero(theme == t))
        n_bags = len(members) // bag_size
        out[members[: n_bags * bag_size]] = next_id + np.arange(n_bags * bag_size) // bag_size
        next_id += n_bags
    return out


@dataclass(frozen=True)
class Bags:
    """Bagged samples: ``data`` (inputs with their bag's offset added, sources = bag ids), ``x`` its
    inputs (N, ...) float32, ``labels`` (N,), ``bag`` (N,) bag of each sample, ``offsets`` (bags,)."""

    data: SourceTaggedDataset
    x: torch.Tensor
    labels: np.ndarray
    bag: np.ndarray
    offsets: np.ndarray

    def bag_batches(self) -> list[np.ndarray]:
        """Positions of each bag's samples, one array per bag (bag order)."""
        order = np.argsort(self.bag, kind="stable")
        return np.split(order, np.cumsum(np.bincount(self.bag))[:-1])


def make_bags(x: torch.Tensor, labels: np.ndarray, *, bag_size: int, skew: float, nuisance: float,
              seed: int) -> Bags:
    """Cut samples ``x`` (N, ...) with ``labels`` (N,) into bags (``bag_ids``) and add to every input of
    bag b one offset ``o_b ~ Normal(0, nuisance^2)`` (input units). Samples left out are dropped."""
    if nuisance < 0:
        raise ValueError(f"nuisance must be >= 0 (std of the per-bag offset), got {nuisance}")
    rng = np.random.default_rng(seed)
    bag = bag_ids(labels, bag_size, skew, rng)
    keep = np.flatnonzero(bag >= 0)
    if len(keep) == 0:
        raise ValueError(f"no bag of {bag_size} samples fits {len(labels)} samples; lower bag_size")
    bag, y = bag[keep], np.asarray(labels)[keep].astype(np.int64)
    offsets = rng.normal(0.0, nuisance, size=int(bag.max()) + 1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    xb = x[torch.from_numpy(keep)] + torch.as_tensor(offsets[bag], dtype=x.dtype).reshape(shape)
    names = [f"bag_{b}" for b in range(len(offsets))]
    data = SourceTaggedDataset(ArrayDataset(xb, y), bag, y, source_names=names)
    return Bags(data, xb, y, bag, offsets)
