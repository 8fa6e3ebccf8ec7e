import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn import Population, PopulationStats, buffer_stats, mix_stats
from shiftbn.bn.moments import BNStats, Moments, SourceStats
from tests.helpers import assert_same_state, state_of


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        net[1].running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    return net


def _sample_stats():
    return BNStats({"1": Moments(10, np.zeros(4), np.full(4, 20.0)), "4": Moments(10, np.ones(2), np.full(2, 10.0))},
                   10)


def test_buffer_stats_are_population_parameters_that_cannot_be_merged():
    model = _net()
    ema = buffer_stats(model)
    assert isinstance(ema, PopulationStats) and not hasattr(ema, "merge")
    assert isinstance(ema["1"], Population) and ema["1"].channels == 4
    np.testing.assert_array_equal(ema["1"].mean, [1, 2, 3, 4])
    np.testing.assert_array_equal(ema["1"].var, [0.5, 1, 2, 4])
    assert ema["1"].mean.dtype == np.float64
    with pytest.raises(TypeError, match="PopulationStats"):
        _sample_stats().merge(ema)
    with pytest.raises(TypeError, match="PopulationStats"):
        SourceStats({"a": _sample_stats(), "ema": ema}).pooled()
    with pytest.raises(TypeError, match="cannot be merged"):
        _sample_stats()["1"].merge(ema["1"])


def test_mix_stats_accepts_either_type_and_returns_population_stats():
    model = _net()
    ema, sample = buffer_stats(model), _sample_stats()
    for a, b in [(ema, sample), (sample, ema), (ema, ema), (sample, sample)]:
        mixed = mix_stats(a, b, 0.25)
        assert isinstance(mixed, PopulationStats)
        for k in mixed:
            np.testing.assert_allclose(mixed[k].mean, 0.25 * a[k].mean + 0.75 * b[k].mean, rtol=1e-15)
            np.testing.assert_allclose(mixed[k].var, 0.25 * a[k].var + 0.75 * b[k].var, rtol=1e-15)
    with pytest.raises(TypeError, match="PopulationStats"):
        sample.merge(mix_stats(sample, sample, 0.5))
    with pytest.raises(TypeError, match="BNStats or PopulationStats"):
        mix_stats({"1": None}, sample, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_stats(ema, sample, 1.5)


def test_use_and_load_stats_accept_population_stats():
    model = _net()
    model.train()
    before = state_of(model)
    mixed = mix_stats(buffer_stats(model), _sample_stats(), 0.5)
    with sb.use_stats(model, mixed):
        np.testing.assert_allclose(model[1].running_mean.numpy(), mixed["1"].mean, rtol=1e-6)
        np.testing.assert_allclose(model[1].running_var.numpy(), mixed["1"].var, rtol=1e-6)
    assert_same_state(model, before)
    sb.load_stats(model, mixed)
    np.testing.assert_allclose(model[4].running_var.numpy(), mixed["4"].var, rtol=1e-6)
    df = mixed.to_frame()
    assert list(df.columns) == ["layer", "channel", "mean", "var"] and len(df) == 6
    back = PopulationStats.from_dict(mixed.to_dict())
    np.testing.assert_array_equal(back["1"].var, mixed["1"].var)


def test_buffer_stats_names_layers_without_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2),
                          nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"\['1'\].*track_running_stats=False.*collect_stats"):
        buffer_stats(model)


def test_population_stats_from_dict_is_validated():
    good = {"num_samples": None, "layers": {"1": {"mean": [0.0, 1.0], "var": [1.0, 2.0]}}}
    assert PopulationStats.from_dict(good)["1"].channels == 2
    bad = {"layers": {"1": {"mean": [0.0, 1.0], "var": [1.0]}}}
    with pytest.raises(ValueError, match=r"layer '1'.*mean has 2 channels but var has 1"):
        PopulationStats.from_dict(bad)
    with pytest.raises(ValueError, match=r"layer '1'.*var must be >= 0"):
        PopulationStats.from_dict({"layers": {"1": {"mean": [0.0], "var": [-1.0]}}})
    with pytest.raises(ValueError, match="num_samples"):
        PopulationStats.from_dict({**good, "num_samples": -3})
