"""Drift monitoring: how far a batch (or a day) of a site's data has moved from a reference site, per BN layer.

Why: a site's BN-input statistics move before anyone has labels to see its accuracy move. A score
is only an alarm if it exceeds the reference site's own batch-to-batch variation at the same batch
size, so the monitor keeps that null (per-sample moments of the reference data) and draws it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from shiftbn._forward import Forward, check_forward
from shiftbn._torch import Inputs
from shiftbn.bn import buffer_stats, split_site
from shiftbn.bn.shift import w2
from shiftbn.sites.atc import ATC, RANGE_FACTOR, VALIDATED_ERROR, fit_atc
from shiftbn.sites.sample_moments import SampleMoments, sample_moments

CORRECTION = "Benjamini-Hochberg"
"""How ``rank_sites`` adjusts p-values over the sites scored together (false discovery rate)."""


@dataclass
class DriftResult:
    """One scored batch: ``score`` (mean over layers of the distance's z against the null: the evidence),
    ``p_value``, ``alert`` (p < alpha, this batch alone), ``n`` samples, ``effect`` (mean over layers of the
    distance in the reference's standard deviations: the size of the shift, whatever n), ``layers``: a
    tidy table ``layer, depth, distance, effect, null_mean, null_q95, z, p_value`` (one row per BN layer).

    ATC (with reference labels; else NaN and None): ``predicted_accuracy`` and ``predicted_drop``
    (reference accuracy minus it), ``atc_in_range`` (whether the batch's statistics lie within
    ``RANGE_FACTOR`` times the reference's distance from the model's stored ones, ``range_ratio`` the
    ratio: the only place the estimate was validated) and ``predicted_error``: the validated error of
    the estimate (``VALIDATED_ERROR``) in range, NaN outside, where the estimate means nothing."""

    score: float
    p_value: float
    alert: bool
    n: int
    predicted_accuracy: float
    predicted_drop: float
    layers: pd.DataFrame
    effect: float = float("nan")
    atc_in_range: bool | None = None
    range_ratio: float = float("nan")
    predicted_error: float = float("nan")


class DriftMonitor:
    """Scores new data by per-layer BN-statistic distance (W2) to a reference site, with a bootstrap p-value.

    Why: the null is the reference site's own variation: B pairs of (a batch of n samples drawn with
    replacement from the reference, a resample of the whole reference), so the p-value of a batch of n
    new samples accounts for the batch's and the reference's sampling error alike. Inputs pass the
    model in eval mode (its stored statistics), so shifts propagate through the layers as in deployment.

    Args:
        model: the deployed network (not changed).
        reference: the reference site's inputs (a tensor (N, ...) or a dataset of them).
        labels: the reference's labels (N,), optional: they fit the ATC predictor of the accuracy drop
            (default: the reference's own when it is a labeled ``SourceTaggedDataset``; -1 anywhere: no ATC).
        n_null: null draws per batch size; ``alpha``: alert level of ``score``; ``seed``: of the draws.
        batch_size: forward batch size.
        forward: the user's ``forward(model, x)`` (default ``model(x)``), for fitting and scoring alike. A
            segmenter's dense outputs are not kept: its monitor scores BN statistics only (no ATC).
    """

    def __init__(self, model: nn.Module, reference: Inputs | None = None, *, labels=None, n_null: int = 500,
                 alpha: float = 0.05, seed: int = 0, batch_size: int = 256, amp: bool = False,
                 forward: Forward | None = None, _moments: SampleMoments | None = None,
                 _atc: ATC | None = None) -> None:
        if isinstance(n_null, bool) or not isinstance(n_null, int) or n_null < 20:
            raise ValueError(f"n_null must be an integer >= 20 (p-values have resolution 1/(n_null+1)), got {n_null!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
        self.model, self.n_null, self.alpha, self.seed = model, n_null, float(alpha), int(seed)
        self.batch_size, self.amp, self.forward = batch_size, amp, check_forward(forward)
        if _moments is None:
            if reference is None:
                raise ValueError("DriftMonitor needs reference data (or DriftMonitor.load of a saved monitor)")
            _moments = sample_moments(model, reference, batch_size=batch_size, amp=amp, forward=forward)
            if len(_moments) < 2:
                raise ValueError(f"the reference holds {len(_moments)} sample; it needs at least 2")
            if labels is None:
                labels = getattr(reference, "labels", None)  # a labeled SourceTaggedDataset
            if labels is not None:
                y = np.asarray(labels).reshape(-1)
                if len(y) != len(_moments):
                    raise ValueError(f"labels has {len(y)} entries for {len(_moments)} reference samples")
                if (y >= 0).all() and _moments.logits.shape[1] >= 2:  # class logits: ATC applies
                    _atc = fit_atc(_moments.logits, y)
        self.moments, self.atc = _moments, _atc
        self.layer_names = sorted(self.moments.mean, key=self.moments.depth.__getitem__)
        self.reference_mean = {k: self.moments.mean[k].mean(0) for k in self.layer_names}
        self.reference_var = {k: np.maximum(self.moments.sq[k].mean(0) - self.reference_mean[k] ** 2, 0.0)
                              for k in self.layer_names}
        self._nulls: dict[int, np.ndarray] = {}
        self._stored_reference = self._from_stored(self.reference_mean, self.reference_var)

    @property
    def n_reference(self) -> int:
        return len(self.moments)

    def null(self, n: int) -> np.ndarray:
        """Per-layer distances (n_null, layers) of reference batches of ``n`` samples: each a draw of n with
        replacement against a resample of the whole reference (cached per n)."""
        if n not in self._nulls:
            rng = np.random.default_rng([self.seed, n])
            size = self.n_reference
            batch = rng.multinomial(n, np.full(size, 1.0 / size), size=self.n_null)
            ref = rng.multinomial(size, np.full(size, 1.0 / size), size=self.n_null)
            cols = []
            for k in self.layer_names:
                mb, vb = self.moments.batch_moments(k, batch)
                mr, vr = self.moments.batch_moments(k, ref)
                cols.append(w2(mb, vb, mr, vr))
            self._nulls[n] = np.stack(cols, axis=1)
        return self._nulls[n]

    def score(self, data: Inputs) -> DriftResult:
        """Score ``data`` (a tensor (N, ...) or a dataset; a batch or a whole day) as one sample of N."""
        new = sample_moments(self.model, data, batch_size=self.batch_size, amp=self.amp, forward=self.forward)
        missing = [k for k in self.layer_names if k not in new.mean]
        if missing:
            raise ValueError(f"the model's BN layers {missing} saw no input; is this the model the monitor was "
                             "fitted for?")
        if len(new) < 2:
            raise ValueError("score needs at least 2 samples (one sample has no variance to compare)")
        ones = np.ones((1, len(new)))
        moments = {k: new.batch_moments(k, ones) for k in self.layer_names}
        dist = np.array([float(w2(*moments[k], self.reference_mean[k], self.reference_var[k])[0])
                         for k in self.layer_names])
        stored = self._from_stored({k: m[0] for k, (m, _) in moments.items()},
                                   {k: v[0] for k, (_, v) in moments.items()})
        return self._result(dist, len(new), new.logits, stored)

    def _from_stored(self, mean: dict, var: dict) -> float:
        """Mean over the BN layers of the W2 distance of (mean, var) to the model's stored statistics (NaN
        when the model keeps none, or only BN's initial ones): ATC's range check, as in ``choose_strategy``."""
        try:
            stored = buffer_stats(self.model)
        except ValueError:  # track_running_stats=False: no stored statistics to compare with
            return float("nan")
        plain = [k for k in self.layer_names if split_site(k)[1] is None and k in stored.layers]
        if not plain or all((stored.layers[k].mean == 0).all() and (stored.layers[k].var == 1).all() for k in plain):
            return float("nan")  # BN's initial buffers: a model never run in train mode has no range to check
        return float(np.mean([w2(stored.layers[k].mean, stored.layers[k].var, mean[k], var[k]) for k in plain]))

    def _result(self, dist: np.ndarray, n: int, logits: np.ndarray | None, stored: float) -> DriftResult:
        null = self.null(n)
        mu, sd = null.mean(0), null.std(0, ddof=1) + 1e-12
        z = (dist - mu) / sd
        z_null = ((null - mu) / sd).mean(1)
        score = float(z.mean())
        p_layers = (1 + (null >= dist).sum(0)) / (1 + len(null))
        p = float((1 + (z_null >= score).sum()) / (1 + len(null)))
        effect = dist / np.array([np.sqrt(self.reference_var[k].mean()) + 1e-12 for k in self.layer_names])
        table = pd.DataFrame({"layer": self.layer_names, "depth": [self.moments.depth[k] for k in self.layer_names],
                              "distance": dist, "effect": effect, "null_mean": mu,
                              "null_q95": np.quantile(null, 0.95, axis=0), "z": z, "p_value": p_layers})
        result = DriftResult(score, p, p < self.alpha, n, float("nan"), float("nan"), table, float(effect.mean()))
        if self.atc is not None and logits is not None and logits.ndim == 2 and logits.shape[1] >= 2:
            result.predicted_accuracy = self.atc.predict(logits)
            result.predicted_drop = self.atc.accuracy - result.predicted_accuracy
            result.range_ratio = stored / self._stored_reference if self._stored_reference > 0 else float("nan")
            result.atc_in_range = bool(stored <= RANGE_FACTOR * self._stored_reference + 1e-12)
            result.predicted_error = VALIDATED_ERROR if result.atc_in_range else float("nan")
        return result

    def save(self, path: str | Path) -> Path:
        """Write the fitted monitor (safetensors + JSON header, atomic; no pickle). See ``drift_file``."""
        from shiftbn.sites.drift_file import write_monitor

        return write_monitor(self, path)

    @classmethod
    def load(cls, model: nn.Module, path: str | Path, **kwargs) -> DriftMonitor:
        """A monitor saved with ``save``, for ``model`` (its BN layers must match the file's)."""
        from shiftbn.sites.drift_file import read_monitor

        moments, atc, header = read_monitor(path, model)
        opts = {"n_null": header["n_null"], "alpha": header["alpha"], "seed": header["seed"], **kwargs}
        return cls(model, _moments=moments, _atc=atc, **opts)


def rank_sites(results: Mapping[str, DriftResult], alpha: float = 0.05) -> pd.DataFrame:
    """The sites scored by one monitor, ranked, with p-values adjusted over them (Benjamini-Hochberg).

    Why: scoring many sites at once, some p-values fall below alpha by chance, and every site differs a
    little from the reference; the adjustment keeps the expected share of false alarms among the alerts
    at ``alpha`` (with no drifted site, the chance of any alert), and ``effect`` says how large each
    shift is. Rows: alerts first, then by ``effect``, largest first.

    Args:
        results: site name -> its ``DriftResult`` (``DriftMonitor.score``).
        alpha: false discovery rate of the alerts, in (0, 1).

    Returns:
        One row per site: ``rank, site, n, effect, score, p_value, p_adjusted, alert, predicted_accuracy,
        predicted_error, atc_in_range, range_ratio``.
    """
    from scipy.stats import false_discovery_control

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if not results:
        raise ValueError("rank_sites needs at least one scored site")
    rows = pd.DataFrame([{"site": str(site), "n": r.n, "effect": r.effect, "score": r.score, "p_value": r.p_value,
                          "predicted_accuracy": r.predicted_accuracy, "predicted_error": r.predicted_error,
                          "atc_in_range": r.atc_in_range, "range_ratio": r.range_ratio}
                         for site, r in results.items()])
    rows.insert(5, "p_adjusted", false_discovery_control(rows["p_value"].to_numpy(), method="bh"))
    rows.insert(6, "alert", rows["p_adjusted"] < alpha)
    rows = rows.sort_values(["alert", "effect"], ascending=False, kind="stable").reset_index(drop=True)
    rows.insert(0, "rank", np.arange(1, len(rows) + 1))
    return rows
