"""Statistics from several domains through one shared BN module (paper Section 5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from shiftbn._torch import forward_batches
from shiftbn.bn import collect_stats, use_stats
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import metric_value
from shiftbn.studies.base import FigureSpec, Study, TrainConfig
from shiftbn.studies.common import make_model
from shiftbn.studies.training import train

Norm = Literal["per-domain", "joint"]
NORMS = ("per-domain", "joint")


@dataclass(kw_only=True)
class SharedDomains(Study):
    """Train a head shared across two domains with per-domain or joint BN, test with either statistics.

    Why: when one BN layer sees several domains, what matters is consistency — per-domain
    normalization in training needs per-domain statistics at test, joint needs joint. The model is
    ``SharedHeadNet`` of ``width`` (its two feature levels are the domains; ``train.model`` is not
    used). ``per-domain`` test statistics are the per-call-site population statistics
    (``use_stats(per_site=True)``); ``joint`` the statistics of both levels normalized together.
    Rows: ``train_norm, test_stats, consistent, metric, value, seed``.
    """

    name = "shared_domains"
    axis = "train_norms"
    figure = FigureSpec("bars", x="train_norm", hue="test_stats",
                        title="Shared BN across domains: train vs test normalization")
    default_train = TrainConfig(fractions=(0.7, 0.0, 0.3))

    width: int = 8
    train_norms: Sequence[Norm] = NORMS
    test_stats: Sequence[Norm] = NORMS
    precise_samples: int = 2000
    metrics: Sequence[str] = ("accuracy",)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        cfg = self.train
        sp = ds.split(fractions=cfg.fractions, seed=seed)
        net = make_model({"name": "SharedHeadNet", "width": self.width, "joint": value == "joint"}, ds, seed)
        train(net, sp.train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, progress=False)
        rows = []
        for test in self.test_stats:
            net.joint = test == "joint"
            stats = collect_stats(net, sp.train, by_source=False, batch_size=cfg.batch_size,
                                  num_samples=self.precise_samples, seed=seed, progress=False).pooled()
            with use_stats(net, stats, per_site=test == "per-domain"), torch.no_grad():
                out = forward_batches(net, sp.test, 512).numpy()
            for m in self.metrics:
                rows.append({"train_norm": value, "test_stats": test, "consistent": value == test,
                             "metric": m, "value": metric_value(m, out, sp.test.labels), "seed": seed})
        net.joint = value == "joint"
        return pd.DataFrame(rows)
