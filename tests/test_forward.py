"""A user's forward(model, x) reaches every verb that runs the model (pytorch/pytorch#49082)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import shiftbn as sb
from shiftbn._forward import Runner
from shiftbn.adapt.prior import prior_stats
from shiftbn.adapt.tent import tent_online_logits


def _net3d():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1))
    for m in net.modules():  # stored statistics unlike the data's, so eval and batch modes differ
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _micro(parts):
    def forward(model, x):
        return torch.cat([model(chunk) for chunk in torch.tensor_split(x, parts)])
    return forward


def _volumes(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, 6, generator=g) * 2 + 1


def _close(a, b, tol=1e-6):
    for name in a:
        assert np.allclose(a[name].mean, b[name].mean, atol=tol, rtol=tol), name
        assert np.allclose(a[name].var, b[name].var, atol=tol, rtol=tol), name


@pytest.mark.parametrize("mode", ["eval", "sequential"])
def test_micro_batches_of_a_batch_give_the_statistics_of_the_whole_batch(mode):
    net, x = _net3d(), _volumes()
    whole = sb.collect_stats(net, [x], by_source=False, mode=mode, progress=False)["pooled"]
    micro = sb.collect_stats(net, [x], by_source=False, mode=mode, progress=False, forward=_micro(4))["pooled"]
    assert micro.num_samples == whole.num_samples == 16
    _close(micro, whole)


def test_in_batch_mode_micro_batches_are_the_normalization_batches():
    net, x = _net3d(), _volumes()
    micro = sb.collect_stats(net, [x], by_source=False, mode="batch", progress=False, forward=_micro(4))["pooled"]
    quarters = sb.collect_stats(net, list(torch.tensor_split(x, 4)), by_source=False, mode="batch",
                                progress=False)["pooled"]
    whole = sb.collect_stats(net, [x], by_source=False, mode="batch", progress=False)["pooled"]
    _close(micro, quarters)
    assert not np.allclose(micro["4"].var, whole["4"].var, atol=1e-4)  # the second layer sees other inputs


def test_a_sliding_window_that_covers_the_volume_gives_the_plain_statistics():
    net, x = _net3d(), _volumes(8)

    def windows(model, v):  # windows of the whole volume, as sliding_window_inference with roi = volume
        return model(v)

    for mode in ("batch", "sequential"):
        plain = sb.collect_stats(net, [x], by_source=False, mode=mode, progress=False)["pooled"]
        slid = sb.collect_stats(net, [x], by_source=False, mode=mode, progress=False, forward=windows)["pooled"]
        _close(slid, plain, 1e-9)


class _Pairs(Dataset):
    """Items ({"a": x[:, :2], "b": x[:, 2:]}, y): a two-input model's data."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"a": self.x[i, :2], "b": self.x[i, 2:]}, int(self.y[i])


class _TwoInputs(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(torch.cat([a, b], 1))


def test_matrix_with_a_forward_for_a_two_input_model_equals_the_plain_model():
    ds = sb.load("blobs-labs", n=80, n_features=4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    paired = sb.SourceTaggedDataset(_Pairs(x, ds.labels), ds.source_ids, ds.labels, source_names=ds.source_names)
    strategies = ["ema", "target", "precise", "prior:8", "batch:8", "tent:all", "prior:4@6"]
    plain = sb.cross_source_matrix(net, ds, strategies, progress=False)
    two = _TwoInputs(net)
    mine = sb.cross_source_matrix(two, paired, strategies, progress=False,
                                  forward=lambda model, inp: model(inp["a"], inp["b"]))
    assert np.allclose(plain["value"].to_numpy(), mine["value"].to_numpy(), atol=1e-6)
    with pytest.raises(TypeError, match="batch must be a tensor|dict|forward"):
        sb.cross_source_matrix(two, paired, ["ema"], progress=False)


def test_precise_bn_and_prior_stats_take_the_forward():
    net, x = _net3d(), _volumes()
    a, b = _net3d(), _net3d()
    sa = sb.precise_bn(a, [x], num_samples=None, progress=False, mode="sequential")
    sb_ = sb.precise_bn(b, [x], num_samples=None, progress=False, mode="sequential", forward=_micro(2))
    _close(sa, sb_)
    one = prior_stats(net, x, prior=8, batch_size=4)  # layer by layer, batches of 4
    two = prior_stats(net, x, prior=8, batch_size=4, forward=_micro(2))
    _close(one, two)


def test_tent_adapts_3d_batchnorm_only_when_asked():
    net, x = _net3d(), _volumes(8)
    with pytest.raises(ValueError, match="tent:B:all|all_bn"):
        tent_online_logits(net, x, batch_size=4, seed=0)
    before = [p.clone() for p in net.parameters()]
    adapted = tent_online_logits(net, x, batch_size=4, seed=0, all_bn=True, lr=0.1)
    batch = tent_online_logits(net, x, batch_size=4, seed=0, all_bn=True, lr=1e-12)
    assert adapted.shape == (8, 3, 6, 6, 6)
    assert not torch.allclose(adapted, batch)  # the later batches see the adapted affine parameters
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters(), strict=True))  # a copy adapted
    assert sb.parse_strategy("tent:all").name == "tent:all"


def test_a_forward_that_loses_rows_or_returns_no_tensor_is_refused_naming_the_fix():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="one output per sample"):
        Runner(forward=lambda m, v: m(v)[:3]).outputs(net, x, torch.device("cpu"))
    with pytest.raises(TypeError, match="return the logits"):
        Runner(forward=lambda m, v: {"logits": m(v)}).outputs(net, x, torch.device("cpu"))
    with pytest.raises(TypeError, match="callable forward"):
        sb.collect_stats(net, [x], forward="model", progress=False)
