import warnings

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn.moments import BNStats, Moments
from tests.helpers import assert_same_state, state_of


def _net(track=True, affine=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=track, affine=affine),
                         nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def _stats(mean0=1.0, var0=4.0):
    return BNStats({
        "1": Moments(100, np.full(4, mean0), np.full(4, var0 * 100)),
        "4": Moments(100, np.zeros(2), np.full(2, 100.0)),
    }, 100)


def test_use_stats_loads_population_stats_in_eval_and_restores():
    model = _net()
    model.train()
    before = state_of(model)
    with sb.use_stats(model, _stats()) as m:
        assert m is model and not any(x.training for x in model.modules())
        assert torch.equal(model[1].running_mean, torch.ones(4))
        assert torch.equal(model[1].running_var, torch.full((4,), 4.0))
        x = torch.randn(5, 3)
        h = model[0](x)
        expected = (h - 1.0) / torch.sqrt(torch.tensor(4.0) + model[1].eps) * model[1].weight + model[1].bias
        assert torch.allclose(model[1](h), expected, atol=1e-6)
    assert_same_state(model, before)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_use_stats_restores_on_exception_and_interrupt(exc):
    model = _net()
    before = state_of(model)
    buffer_obj = model[1].running_mean
    with pytest.raises(exc), sb.use_stats(model, _stats()):
        raise exc()
    assert_same_state(model, before)
    assert model[1].running_mean is buffer_obj


def test_untracked_and_non_affine_bn_handled():
    model = _net(track=False, affine=False)
    before = state_of(model)
    x = torch.randn(6, 3)
    with sb.use_stats(model, _stats()):
        h = model[0](x)
        assert torch.allclose(model[1](h), (h - 1.0) / torch.sqrt(torch.tensor(4.0 + 1e-5)), atol=1e-6)
    assert model[1].running_mean is None and not model[1].track_running_stats
    assert_same_state(model, before)
    stats = sb.collect_stats(model, [x, x + 1], by_source=False, progress=False)
    assert set(stats["pooled"]) == {"1", "4"}


def test_load_stats_is_permanent_and_checks_channels():
    model = _net()
    sb.load_stats(model, _stats(mean0=2.0))
    assert torch.equal(model[1].running_mean, torch.full((4,), 2.0))
    bad = BNStats({"1": Moments(10, np.zeros(3), np.ones(3))})
    with pytest.raises(ValueError, match="4 channels"):
        sb.load_stats(model, bad)
    with pytest.raises(ValueError, match="match no BN layer"):
        sb.load_stats(model, BNStats({"other": Moments(10, np.zeros(4), np.ones(4))}))
    with pytest.raises(ValueError, match="lack BN layer"):
        sb.load_stats(model, BNStats({"1": _stats()["1"]}), strict=True)


def test_frozen_bn_survives_train_calls_and_releases():
    model = _net()
    model.train()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    with sb.freeze_bn(model):
        model.train()
        x = torch.randn(8, 3)
        out = model(x)
        assert torch.equal(model[1].running_mean, torch.full((4,), 3.0))  # no EMA update
        out.sum().backward()
        assert model[1].weight.grad is not None  # affine parameters still train
    assert model[1].training
    handle = sb.freeze_bn(model)
    model(torch.randn(4, 3))
    assert not model[1].training
    handle.release()
    assert model[1].training


def test_bn_layers_discovery_order_and_warnings():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2), nn.BatchNorm2d(2),
                          nn.Sequential(nn.LazyBatchNorm1d()), nn.SyncBatchNorm(2))
    with pytest.warns(UserWarning, match="GroupNorm"):
        layers = sb.bn_layers(model)
    assert [(layer.name, layer.depth) for layer in layers] == [("2", 0), ("3.0", 1), ("4", 2)]
    with pytest.raises(ValueError, match="no BatchNorm"), pytest.warns(UserWarning, match="LayerNorm"):
        sb.bn_layers(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="not initialized"):
        sb.collect_stats(lazy, [torch.randn(4, 3)], progress=False)
    lazy(torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = sb.collect_stats(lazy, [torch.randn(4, 3)], by_source=False, progress=False)
    assert stats["pooled"]["1"].channels == 4
