"""Pieces every study shares: building and training a model for a dataset, seeds, fingerprints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from shiftbn.data.tagged import SourceTaggedDataset, Splits
from shiftbn.samplers import SamplerMode
from shiftbn.studies.base import ModelSpec, TrainConfig
from shiftbn.studies.models import build_model
from shiftbn.studies.training import train


def make_model(spec: ModelSpec, ds: SourceTaggedDataset, seed: int) -> nn.Module:
    """A fresh model for ``ds``: ``spec`` is a model name, ``{"name": ..., **kwargs}``, or ``factory(seed)``."""
    if callable(spec):
        return spec(seed)
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name")
    # segmentation sets have no class id per sample; their class names count the classes (background too)
    num_classes = int(np.max(ds.labels)) + 1 if ds.labels is not None else len(ds.class_names or ())
    if num_classes == 0:
        raise ValueError("the dataset has neither labels nor class_names, so the number of classes is unknown; "
                         "give the dataset class_names (background included) or the model as a factory(seed)")
    return build_model(name, tuple(ds[0][0].shape), num_classes, seed=seed, **spec)


def fit(cfg: TrainConfig, ds: SourceTaggedDataset, seed: int, **train_kwargs: Any) -> nn.Module:
    """Build ``cfg.model`` and train it on ``ds`` with ``cfg``'s steps, batch size and learning rate
    (``train_kwargs`` override them, see ``shiftbn.studies.training.train``); returned in eval mode."""
    model = make_model(cfg.model, ds, seed)
    kwargs = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "progress": False, **train_kwargs}
    train(model, ds, seed=seed, **kwargs)
    return model.eval()


def held_out_values(ds: SourceTaggedDataset, held_out: Sequence[str] | None) -> list[str]:
    """The sources a leave-one-out study holds out in turn: ``held_out`` (each checked) or every source."""
    targets = list(ds.sources_present if held_out is None else [str(h) for h in held_out])
    for h in targets:
        ds.source_id(h)
    return targets


def fit_without(cfg: TrainConfig, ds: SourceTaggedDataset, held_out: str, seed: int,
                mode: SamplerMode) -> tuple[Splits, list[str], nn.Module]:
    """Leave-one-out training: ``(split, rest, model)`` with ``ds`` split by ``cfg.fractions`` and the
    model trained (``mode``: training batch composition) on the train split of every source but
    ``held_out``, whose names are ``rest``."""
    sp = ds.split(fractions=cfg.fractions, seed=seed)
    rest = [s for s in ds.sources_present if s != held_out]
    return sp, rest, fit(cfg, sp.train.subset(rest), seed, mode=mode)
