"""Drift detection, validated: a reference lab's held-out data shifted with growing severity, scored by a monitor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from shiftbn._torch import forward_batches, stack_inputs
from shiftbn.data.labshift import LabShift
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.sites.drift import DriftMonitor
from shiftbn.studies.base import FigureSpec, Study
from shiftbn.studies.common import fit

SHIFTS = ("intensity", "blur", "noise", "gamma")


def shift_at(kind: str, severity: float, seed: int = 0) -> LabShift:
    """The acquisition shift ``kind`` at ``severity`` >= 0 (0 = none): ``intensity`` gain 1+s and offset
    s/4; ``blur`` sigma 1.5 s pixels; ``noise`` std 0.2 s; ``gamma`` 1/(1+s)."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; choose from {SHIFTS}")
    if not severity >= 0:
        raise ValueError(f"severity must be >= 0, got {severity!r}")
    s = float(severity)
    return {"intensity": LabShift(gain=1 + s, offset=s / 4, seed=seed), "blur": LabShift(blur_sigma=1.5 * s, seed=seed),
            "noise": LabShift(noise_std=0.2 * s, seed=seed), "gamma": LabShift(gamma=1 / (1 + s), seed=seed)}[kind]


@dataclass(kw_only=True)
class DriftDetection(Study):
    """Fit ``DriftMonitor``s on halves of a reference lab's held-out samples; score batches of the other
    half under one acquisition shift at growing ``severities``.

    Why: a monitor is useful if it alarms on shifts that cost accuracy, rarely alarms without one, and
    its score orders shifts by the damage they do. The model trains on every lab's training split;
    the reference lab's calibration and test splits (never trained on) are split at random in two
    ``n_refits`` times: one half fits a monitor (with labels: ATC), ``n_batches`` batches of
    ``batch_size`` are drawn from the other half (seeded), shifted, and scored. Refitting spreads the
    false-alarm estimate over many references (one fixed reference has its own false-alarm rate).
    Rows (one per shift, severity, metric, seed): metric ``detection_rate`` (p < ``alpha``; at severity
    0 the false-alarm rate), ``detection_empirical`` (score above the 95th percentile of the
    severity-0 scores of the same seed: detection at exactly 5% false alarms), ``score`` (mean),
    ``true_drop`` (accuracy on all the held-out samples, unshifted minus shifted, in [0, 1]) and
    ``predicted_drop`` (ATC, mean over batches); ``value``; plus ``shift, severity, seed``.
    """

    name = "drift_detection"
    axis = "shift"
    figure = FigureSpec("lines", x="severity", hue="shift", where=(("metric", "detection_rate"),),
                        title="Drift alarms (p < alpha) by shift severity", xlabel="shift severity")

    shift: Sequence[str] = SHIFTS
    severities: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    reference: str | None = None
    batch_size: int = 32
    n_refits: int = 10
    n_batches: int = 10
    n_null: int = 500
    alpha: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind in self.shift:
            shift_at(kind, 0.0)
        if 0.0 not in [float(s) for s in self.severities]:
            raise ValueError("severities must include 0 (the no-shift batches that set the false-alarm rate)")
        if self.batch_size < 2 or self.n_batches < 1 or self.n_refits < 1:
            raise ValueError(f"batch_size must be >= 2, n_batches and n_refits >= 1; got {self.batch_size}, "
                             f"{self.n_batches}, {self.n_refits}")

    def axis_values(self, ds: SourceTaggedDataset) -> list[str]:
        return list(self.shift)

    def cell(self, ds: SourceTaggedDataset, seed: int, value: str) -> pd.DataFrame:
        ref = self.reference or ds.sources_present[0]
        sp = ds.split(fractions=self.train.fractions, seed=seed)
        model = fit(self.train, sp.train, seed)
        parts = [sp.calibration.subset(ref), sp.test.subset(ref)]
        x = torch.cat([stack_inputs(p) for p in parts])
        y = np.concatenate([p.labels for p in parts])
        half = len(x) // 2
        if len(x) - half < self.batch_size:
            raise ValueError(f"the reference lab {ref!r} has {len(x)} held-out samples; half of them ({len(x) - half}) "
                             f"is fewer than batch_size {self.batch_size}")
        rng = np.random.default_rng([seed, 7])
        perms = [rng.permutation(len(x)) for _ in range(self.n_refits)]
        monitors = [DriftMonitor(model, x[torch.as_tensor(p[:half])], labels=y[p[:half]], n_null=self.n_null,
                                 alpha=self.alpha, seed=1000 * seed + r) for r, p in enumerate(perms)]
        draws = [(r, rng.choice(p[half:], self.batch_size, replace=False)) for r, p in enumerate(perms)
                 for _ in range(self.n_batches)]
        base_acc = _accuracy(model, x, y)
        per = {}
        for sev in sorted(float(s) for s in self.severities):
            xs = shift_at(value, sev, seed).apply(x) if sev > 0 else x
            results = [monitors[r].score(xs[torch.as_tensor(idx)]) for r, idx in draws]
            per[sev] = (results, base_acc - _accuracy(model, xs, y))
        cut = np.quantile([r.score for r in per[0.0][0]], 0.95)
        rows = []
        for sev, (results, drop) in per.items():
            scores = np.array([r.score for r in results])
            metrics = {"detection_rate": np.mean([r.alert for r in results]),
                       "detection_empirical": np.mean(scores > cut), "score": scores.mean(), "true_drop": drop,
                       "predicted_drop": np.mean([r.predicted_drop for r in results])}
            rows += [{"shift": value, "severity": sev, "metric": m, "value": float(v)} for m, v in metrics.items()]
        return pd.DataFrame(rows).assign(seed=seed)


def _accuracy(model, x: torch.Tensor, y: np.ndarray) -> float:
    with torch.no_grad():
        out = forward_batches(model.eval(), x, 256)
    return float((out.argmax(1).numpy() == y).mean())


def drift_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed, over every (shift, severity > 0): Spearman rank correlation of the mean score, and of the
    ATC predicted drop, with the true accuracy drop; false-alarm rate (severity 0) and mean detection.

    Returns tidy rows ``seed, quantity, value`` (quantities: ``spearman_score_drop``,
    ``spearman_predicted_drop``, ``false_alarm_rate``, ``detection_rate``, ``detection_empirical``).
    """
    from scipy.stats import spearmanr

    rows = []
    for seed, g in table.groupby("seed", sort=True):
        wide = g.pivot_table(index=["shift", "severity"], columns="metric", values="value").reset_index()
        shifted = wide[wide["severity"] > 0]
        zero = wide[wide["severity"] == 0]
        vals = {"spearman_score_drop": spearmanr(shifted["score"], shifted["true_drop"]).statistic,
                "spearman_predicted_drop": spearmanr(shifted["predicted_drop"], shifted["true_drop"]).statistic,
                "false_alarm_rate": zero["detection_rate"].mean(), "detection_rate": shifted["detection_rate"].mean(),
                "detection_empirical": shifted["detection_empirical"].mean()}
        rows += [{"seed": seed, "quantity": k, "value": float(v)} for k, v in vals.items()]
    return pd.DataFrame(rows)
