import json

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn.moments import BNStats, Moments, SourceStats
from tests.helpers import assert_same_state, state_of


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def _good(c=4, n=10):
    return {"count": n, "mean": [0.5] * c, "m2": [2.0] * c}


def test_load_stats_is_all_or_nothing_when_the_last_layer_is_bad():
    model = _net()
    before = state_of(model)
    bad = BNStats({"1": Moments(10, np.full(4, 7.0), np.full(4, 10.0)),
                   "4": Moments(10, np.zeros(3), np.ones(3))})  # last layer: 3 channels, BN has 2
    with pytest.raises(ValueError, match=r"'4'.*2 channels.*3"):
        sb.load_stats(model, bad)
    assert_same_state(model, before)
    nan = BNStats({"1": Moments(10, np.zeros(4), np.ones(4)),
                   "4": Moments(10, np.array([0.0, np.nan]), np.ones(2))})
    with pytest.raises(ValueError, match=r"'4'.*NaN"):
        sb.load_stats(model, nan)
    assert_same_state(model, before)


def test_write_stats_refuses_broadcasting_and_negative_variances():
    model = _net()
    before = state_of(model)
    short_var = BNStats({"1": Moments(10, np.zeros(4), np.ones(1))})  # would broadcast into 4 channels
    with pytest.raises(ValueError, match=r"'1'.*mean has 4 channels but var has 1"):
        sb.load_stats(model, short_var)
    negative = BNStats({"1": Moments(10, np.zeros(4), -np.ones(4))})
    with pytest.raises(ValueError, match=r"'1'.*>= 0"), sb.use_stats(model, negative):
        pass
    with pytest.raises(TypeError, match="SourceStats"):
        sb.load_stats(model, SourceStats({"a": BNStats({"1": Moments(10, np.zeros(4), np.ones(4))})}))
    assert_same_state(model, before)


@pytest.mark.parametrize("change, message", [
    ({"m2": [2.0]}, "mean has 4 channels but m2 has 1"),
    ({"mean": [0.0, float("nan"), 0.0, 0.0]}, "mean holds NaN"),
    ({"m2": [1.0, 1.0, float("inf"), 1.0]}, "m2 holds NaN or Inf"),
    ({"m2": [1.0, -1.0, 1.0, 1.0]}, "m2 must be >= 0"),
    ({"mean": [[0.0, 0.0], [0.0, 0.0]]}, "1-D"),
    ({"mean": []}, "non-empty"),
    ({"count": 0}, "count must be a positive integer"),
    ({"count": 2.5}, "count must be a positive integer"),
    ({"count": True}, "count must be a positive integer"),
    ({"mean": "abc"}, "list of numbers"),
])
def test_from_dict_validates_and_names_layer_and_source(change, message):
    d = {**_good(), **change}
    with pytest.raises(ValueError, match=message):
        Moments.from_dict(d)
    with pytest.raises(ValueError, match=rf"layer 'conv.bn'.*{message}"):
        BNStats.from_dict({"num_samples": 10, "layers": {"conv.bn": d}})
    file = json.loads(json.dumps({"mode": "batch", "sources": {"lab_b": {"layers": {"conv.bn": d}}}}))
    with pytest.raises(ValueError, match=rf"source 'lab_b'.*layer 'conv.bn'.*{message}"):
        SourceStats.from_dict(file)


def test_from_dict_accepts_valid_files_and_rejects_bad_structure():
    ok = SourceStats.from_dict({"sources": {"a": {"num_samples": 3, "layers": {"l": _good()}}}})
    assert ok["a"]["l"].count == 10 and ok["a"].num_samples == 3
    np.testing.assert_array_equal(ok["a"]["l"].var, [0.2] * 4)
    with pytest.raises(ValueError, match="keys count, mean, m2"):
        Moments.from_dict({"count": 3, "mean": [1.0]})
    with pytest.raises(ValueError, match="'layers' mapping"):
        BNStats.from_dict({"num_samples": 3})
    with pytest.raises(ValueError, match="num_samples"):
        BNStats.from_dict({"num_samples": -1, "layers": {}})
    with pytest.raises(ValueError, match="'sources' mapping"):
        SourceStats.from_dict({"layers": {}})
