"""Pieces every protocol shares: building a model for a dataset, training it, seeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.models import build_model
from shiftbn.train import train

ModelSpec = str | dict | Callable[[int], nn.Module]


def make_model(spec: ModelSpec, ds: SourceTaggedDataset, seed: int) -> nn.Module:
    """A fresh model for ``ds``: ``spec`` is a model name, ``{"name": ..., **kwargs}``, or ``factory(seed)``."""
    if callable(spec):
        return spec(seed)
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name")
    num_classes = int(np.max(ds.labels)) + 1
    return build_model(name, tuple(ds[0][0].shape), num_classes, seed=seed, **spec)


def fit(spec: ModelSpec, ds: SourceTaggedDataset, seed: int, **train_kwargs: Any) -> nn.Module:
    """Build and train a model on ``ds`` (see ``shiftbn.train.train``); returned in eval mode."""
    model = make_model(spec, ds, seed)
    train(model, ds, seed=seed, **train_kwargs)
    return model.eval()


def as_seeds(seeds: int | Sequence[int]) -> list[int]:
    return [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]


def data_fingerprint(ds: SourceTaggedDataset) -> tuple:
    """Cheap fingerprint of a dataset's ids and labels, to check protocols do not modify it."""
    return (ds.source_ids.copy(), None if ds.labels is None else ds.labels.copy())
