"""``shiftbn.integrations``: ``refresh_bn`` for plain loops, model names and ``--model-kwargs`` parsing."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import shiftbn as sb
from shiftbn.bn import buffer_stats, collect_stats, precise_bn
from shiftbn.integrations import BNRefresh, model_factory, parse_model_kwargs, refresh_bn
from tests.helpers import reference_moments


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 8, 8, generator=g)
    x[30:] = x[30:] * 2 + 1  # the second site is shifted
    y = torch.randint(0, 2, (60,), generator=g)
    return sb.SourceTaggedDataset(TensorDataset(x, y), ["a"] * 30 + ["b"] * 30)


def test_refresh_writes_precise_bn_and_measures_drift_against_the_running_stats(data):
    model = _net().train()
    ema = buffer_stats(model)  # fresh model: mean 0, var 1
    result = refresh_bn(model, data, num_samples=None, batch_size=20)
    assert isinstance(result, BNRefresh)
    # PreciseBN: what precise_bn writes on a copy with the same seed and batches
    twin = _net()
    expected = precise_bn(twin, data, num_samples=None, batch_size=20, progress=False)
    for name, m in result.stats.layers.items():
        np.testing.assert_allclose(m.mean, expected.layers[name].mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=0, atol=0)
    # drift of the first layer, source b, against an independent float64 reference of its input
    ref = reference_moments(_net(), [data.base.tensors[0][30:]], bn_train=False)["1"]
    mean0, var0 = ema.layers["1"].mean, ema.layers["1"].var
    w2 = np.mean(np.sqrt((ref[1] - mean0) ** 2 + (np.sqrt(ref[2] + 1e-5) - np.sqrt(var0 + 1e-5)) ** 2))
    row = result.drift.query("source == 'b' and layer == '1' and metric == 'w2'")
    assert len(row) == 1 and row["value"].iloc[0] == pytest.approx(w2, abs=1e-9)
    summary = result.summary()
    assert set(summary["source"]) == {"a", "b"} and list(summary.columns) == ["source", "metric", "mean", "max",
                                                                               "worst_layer"]
    logged = result.metrics()
    assert set(logged) == {"bn_drift/a", "bn_drift/b"}
    mean_b = result.drift.query("source == 'b'")["value"].mean()
    assert logged["bn_drift/b"] == pytest.approx(mean_b, abs=1e-12) and mean_b > 0


def test_refresh_restores_modes_and_random_state_and_writes_only_running_stats(data):
    model = _net().train()
    model[4].eval()  # a user's own mix of modes
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    refresh_bn(model, DataLoader(data, batch_size=16, shuffle=True), num_samples=40)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}


def test_refresh_from_a_loader_uses_its_batch_size_and_its_dataset_per_source(data):
    model = _net()
    result = refresh_bn(model, DataLoader(data, batch_size=20, shuffle=True), num_samples=None, precise=False)
    assert result.stats is None and set(result.drift["source"]) == {"a", "b"}
    assert torch.equal(model[1].running_mean, torch.zeros(3))  # precise=False writes nothing
    direct = refresh_bn(_net(), data, num_samples=None, batch_size=20, precise=False)
    pd.testing.assert_frame_equal(result.drift, direct.drift)
    pooled = refresh_bn(_net(), TensorDataset(data.base.tensors[0]), num_samples=None, batch_size=20,
                        precise=False, drift=True)
    assert set(pooled.drift["source"]) == {"pooled"}


def test_refresh_refuses_a_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        refresh_bn("resnet", [torch.zeros(2, 1, 8, 8)])


def test_refresh_after_training_changes_validation_to_the_population_statistics(data):
    model = _net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb, _ in DataLoader(data, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    result = refresh_bn(model, data, num_samples=None, batch_size=10)
    again = collect_stats(model, data, by_source=False, num_samples=None, batch_size=10, progress=False).pooled()
    for name in result.stats.layers:
        np.testing.assert_allclose(result.stats.layers[name].var, again.layers[name].var, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("items", "expected"), [
    (["num_classes=2", "pretrained=false"], {"num_classes": 2, "pretrained": False}),
    (["spatial_dims=2,in_channels=3,out_channels=2"], {"spatial_dims": 2, "in_channels": 3, "out_channels": 2}),
    (["channels=16,32,64,strides=2,2", "norm=batch"], {"channels": (16, 32, 64), "strides": (2, 2),
                                                       "norm": "batch"}),
    (["drop=0.5", "flag=True", "x=None", "size=(32, 32)", "act=relu"], {"drop": 0.5, "flag": True, "x": None,
                                                                         "size": (32, 32), "act": "relu"}),
    (["layers=[1, 2]"], {"layers": [1, 2]}),
])
def test_model_kwargs_are_parsed_at_the_boundary(items, expected):
    got = parse_model_kwargs(items)
    assert got == expected and all(type(got[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(("items", "match"), [
    (["num_classes"], "--model-kwargs takes KEY=VALUE"),
    (["a=1", "a=2"], "--model-kwargs: a is given twice"),
    (["2x=1"], "KEY=VALUE"),
])
def test_bad_model_kwargs_name_the_flag(items, match):
    with pytest.raises(ValueError, match=match):
        parse_model_kwargs(items)


def test_model_factory_leaves_module_specs_to_the_caller():
    assert model_factory("mypkg.nets:make") is None
    assert model_factory("torch:nn") is None
    with pytest.raises(TypeError, match="string"):
        model_factory(3)
