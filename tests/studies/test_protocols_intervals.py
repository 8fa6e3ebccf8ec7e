import itertools

import numpy as np
import pandas as pd
import pytest

from shiftbn.studies.intervals import format_interval, interval_table, paired_effects, seed_intervals


def _rows(values_by_seed, **extra):
    return pd.DataFrame([{"cell": "a", "seed": s, "value": v, **extra} for s, vs in values_by_seed.items()
                         for v in np.atleast_1d(vs)])


def test_seed_only_interval_is_the_percentile_bootstrap_of_seed_means():
    per_seed = {0: [0.8, 0.9], 1: [0.7, 0.7], 2: [0.95, 0.85]}  # two labs per seed: averaged first
    out = seed_intervals(_rows(per_seed), ["cell"], n_boot=500, seed=3).iloc[0]
    means = np.array([0.85, 0.7, 0.9])
    rng = np.random.default_rng(3)
    reps = means[rng.integers(0, 3, size=(500, 3))].mean(axis=1)
    np.testing.assert_allclose([out["mean"], out["std"]], [means.mean(), means.std(ddof=1)], atol=1e-12)
    np.testing.assert_allclose([out["low"], out["high"]], np.quantile(reps, [0.025, 0.975]), atol=1e-12)
    # the interval lies within the seed means' range (every replicate is a mean of seed means)
    assert means.min() - 1e-12 <= out["low"] <= out["high"] <= means.max() + 1e-12 and out["seeds"] == 3


def test_test_sample_noise_widens_the_interval_like_a_binomial():
    one = _rows({0: 0.8}, metric="accuracy", n=400)
    out = seed_intervals(one, ["cell"], n_boot=4000).iloc[0]
    half = 1.96 * np.sqrt(0.8 * 0.2 / 400)
    np.testing.assert_allclose([out["low"], out["high"]], [0.8 - half, 0.8 + half], atol=0.006)
    no_n = seed_intervals(_rows({0: 0.8}), ["cell"]).iloc[0]
    assert no_n["low"] == no_n["high"] == 0.8
    nll = seed_intervals(_rows({0: 0.8}, metric="nll", n=400), ["cell"]).iloc[0]
    assert nll["low"] == nll["high"] == 0.8  # only accuracies are redrawn


def test_paired_effects_pair_by_seed_and_flag_intervals_that_exclude_zero():
    rows = pd.DataFrame([{"where": w, "eval": e, "seed": s, "value": v}
                         for w, (a, b) in {"big": ([0.9, 0.92, 0.95], [0.6, 0.7, 0.65]),
                                           "none": ([0.8, 0.6, 0.7], [0.7, 0.7, 0.7])}.items()
                         for e, vals in (("A", a), ("B", b)) for s, v in enumerate(vals)])
    eff = paired_effects(rows, ["where"], "eval", "A", "B", n_boot=1000).set_index("where")
    np.testing.assert_allclose(eff.loc["big", "effect"], np.mean([0.3, 0.22, 0.3]), atol=1e-12)
    assert eff.loc["big", "supported"] and not eff.loc["none", "supported"]
    # the seed-only bootstrap of three paired differences: every replicate is a mean of three of them
    diffs = [0.1, -0.1, 0.0]
    possible = {round(float(np.mean(c)), 9) for c in itertools.product(diffs, repeat=3)}
    assert round(eff.loc["none", "low"], 9) in possible and round(eff.loc["none", "high"], 9) in possible


def test_tables_and_errors():
    rows = pd.concat([_rows({0: 0.5, 1: 0.7}).assign(cell=c, col=k) for c in ("x", "y") for k in ("p", "q")])
    table = interval_table(rows, ["cell"], ["col"], n_boot=50)
    assert table.shape == (2, 2) and table.loc["x", "p"].startswith("0.600 ± 0.141 [")
    assert format_interval(0.5, 0.1, 0.4, 0.6) == "0.500 ± 0.100 [0.400, 0.600]"
    with pytest.raises(ValueError, match="lack column"):
        seed_intervals(rows.drop(columns="seed"), ["cell"])
    with pytest.raises(ValueError, match="level"):
        seed_intervals(rows, ["cell"], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        paired_effects(rows, ["cell"], "col", "p", "q", n_boot=3)
