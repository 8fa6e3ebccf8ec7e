"""Statistics from several domains through one shared BN module (paper Section 5.2)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from shiftbn._torch import forward_batches, stack_inputs
from shiftbn.bn import collect_stats, use_stats
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.evaluate import metric_value
from shiftbn.protocols.common import as_seeds, make_model
from shiftbn.train import train

NORMS = ("per-domain", "joint")


def shared_domains(
    ds: SourceTaggedDataset,
    *,
    width: int = 8,
    train_norms: Sequence[str] = NORMS,
    test_stats: Sequence[str] = NORMS,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    precise_samples: int = 2000,
    metrics: Sequence[str] = ("accuracy",),
    fractions: tuple[float, float, float] = (0.7, 0.0, 0.3),
    seeds: int | Sequence[int] = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Train a head shared across two domains with per-domain or joint BN, test with either statistics.

    Why: when one BN layer sees several domains, what matters is consistency — per-domain
    normalization in training needs per-domain statistics at test, joint needs joint. The model is
    ``SharedHeadNet`` (its two feature levels are the domains). ``per-domain`` test statistics are
    the per-call-site population statistics (``use_stats(per_site=True)``); ``joint`` the statistics
    of both levels normalized together. Returns tidy rows: ``train_norm, test_stats, consistent,
    metric, value, seed``.
    """
    for n in list(train_norms) + list(test_stats):
        if n not in NORMS:
            raise ValueError(f"unknown normalization {n!r}; use {NORMS}")
    rows = []
    jobs = [(s, t) for s in as_seeds(seeds) for t in train_norms]
    for seed, train_norm in tqdm(jobs, desc="domains", disable=not progress, leave=False):
        sp = ds.split(fractions=fractions, seed=seed)
        x_test, y_test = stack_inputs(sp.test), sp.test.labels
        net = make_model({"name": "SharedHeadNet", "width": width, "joint": train_norm == "joint"}, ds, seed)
        train(net, sp.train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False)
        for test in test_stats:
            net.joint = test == "joint"
            stats = collect_stats(net, sp.train, by_source=False, batch_size=batch_size,
                                  num_samples=precise_samples, seed=seed, progress=False).pooled()
            with use_stats(net, stats, per_site=test == "per-domain"), torch.no_grad():
                out = forward_batches(net, x_test, 512).numpy()
            for m in metrics:
                rows.append({"train_norm": train_norm, "test_stats": test, "consistent": train_norm == test,
                             "metric": m, "value": metric_value(m, out, y_test), "seed": seed})
        net.joint = train_norm == "joint"
    return pd.DataFrame(rows)
