"""Per-site routing of BN subclasses with their own ``forward`` (timm's ``BatchNormAct2d`` pattern)."""

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import shiftbn as sb
from shiftbn.bn import collect_stats, use_stats
from shiftbn.sites.routed import PerSiteModel, RoutedBN, RoutedForwardBN
from tests.helpers import assert_same_state, state_of


class ActBN(nn.BatchNorm2d):
    """BN then dropout and activation in one module, as timm's ``BatchNormAct2d`` (plus a gain)."""

    def __init__(self, num_features, gain=1.5, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()
        self.gain = gain

    def forward(self, x):
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, self.momentum or 0.0, self.eps)
        return self.act(self.drop(x)) * self.gain


class ManualBN(nn.BatchNorm2d):
    """A subclass that normalizes by hand: no ``F.batch_norm`` call to route."""

    def forward(self, x):
        inv = torch.rsqrt(self.running_var + self.eps)[None, :, None, None]
        return torch.relu((x - self.running_mean[None, :, None, None]) * inv)


class Net(nn.Module):
    def __init__(self, bn=ActBN):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = bn(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn3 = ActBN(4, gain=0.7, track_running_stats=False)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for m in (self.bn1, self.bn2, self.bn3):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))))
        return self.head(x.mean((2, 3)))


SITES = ("a", "b", "c")


@pytest.fixture(scope="module")
def setup():
    model = Net().eval()
    gen = torch.Generator().manual_seed(0)
    data = {s: [torch.randn(16, 1, 6, 6, generator=gen) * (1 + k) + 2 * k for _ in range(2)]
            for k, s in enumerate(SITES)}
    stats = {s: collect_stats(model, b, by_source=False, progress=False)["pooled"] for s, b in data.items()}
    return model, data, stats


def _reference(model, stats, xb, sites):
    out = torch.empty(len(xb), 3)
    for s in set(sites):
        mask = torch.tensor([n == s for n in sites])
        with use_stats(model, stats[s]), torch.no_grad():
            out[mask] = model(xb[mask])
    return out


def _mixed(data):
    xb = torch.cat([data[s][0][:4] for s in SITES])
    sites = [s for s in SITES for _ in range(4)]
    perm = torch.randperm(len(xb), generator=torch.Generator().manual_seed(1))
    return xb[perm], [sites[i] for i in perm]


def test_subclass_forward_is_routed_exactly(setup):
    model, data, stats = setup
    before = state_of(model)
    routed = sb.sites.per_site_model(model, stats)
    assert isinstance(routed.model.bn1, RoutedForwardBN) and type(routed.model.bn1.bn) is ActBN
    assert isinstance(routed.model.bn3, RoutedForwardBN) and type(routed.model.bn2) is RoutedBN
    xb, sites = _mixed(data)
    with torch.no_grad():
        got = routed(xb, site=sites)
    ref = _reference(model, stats, xb, sites)
    assert float(ref.abs().max()) > 0.1
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert_same_state(model, before)


def test_plain_model_keeps_subclass_forward(setup):
    model, data, stats = setup
    routed = sb.sites.per_site_model(model, stats)
    plain = routed.plain_model("b")
    assert type(plain.bn1) is ActBN and type(plain.bn3) is ActBN and not plain.training
    assert not any(isinstance(m, RoutedBN) for m in plain.modules())
    x = data["b"][1][:5]
    with torch.no_grad(), use_stats(model, stats["b"]):
        ref = model(x)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, atol=1e-6, rtol=0)


def test_add_site_collects_through_the_real_forward(setup):
    model, data, stats = setup
    routed = sb.sites.per_site_model(model, stats)
    new = [torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(5)) * 3 - 1]
    got = routed.add_site("d", new, progress=False)
    want = collect_stats(model, new, by_source=False, progress=False)["pooled"]
    assert set(got.layers) == set(want.layers)
    for name in want.layers:
        np.testing.assert_allclose(got[name].mean, want[name].mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[name].var, want[name].var, rtol=1e-6, atol=1e-7)
    with torch.no_grad(), use_stats(model, want):
        ref = model(new[0][:6])
    with torch.no_grad():
        torch.testing.assert_close(routed(new[0][:6], site="d"), ref, atol=1e-6, rtol=0)


def test_export_and_state_dict_of_subclass_model(setup):
    model, data, stats = setup
    routed = sb.sites.per_site_model(model, stats)
    xb, sites = _mixed(data)
    ids = routed.site_ids(sites)
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(routed, (xb,), {"site": ids}, dynamic_shapes={"x": {0: batch}, "site": {0: batch}})
    with torch.no_grad():
        eager = routed(xb[:7], site=ids[:7])
        torch.testing.assert_close(ep.module()(xb[:7], site=ids[:7]), eager, atol=1e-6, rtol=0)
    buf = io.BytesIO()
    torch.save(routed.state_dict(), buf)
    buf.seek(0)
    back = PerSiteModel.from_state_dict(Net(), torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(back(xb, site=ids), routed(xb, site=ids))


def test_unroutable_subclass_is_refused_by_name(setup):
    model = Net(bn=ManualBN).eval()
    _, data, _ = setup
    stats = {"a": collect_stats(model, data["a"], by_source=False, progress=False)["pooled"]}
    with pytest.raises(TypeError, match=r"'bn1' \(.*ManualBN\) overrides forward.*F.batch_norm"):
        sb.sites.per_site_model(model, stats)


def test_subclass_routing_is_per_thread(setup):
    import threading

    model, data, stats = setup
    routed = sb.sites.per_site_model(model, stats)
    xb = data["a"][0][:6]
    with torch.no_grad():
        want = {s: routed(xb, site=s) for s in SITES}
    bad = []

    def run(site):
        with torch.no_grad():
            for _ in range(10):
                if not torch.equal(routed(xb, site=site), want[site]):
                    bad.append(site)

    threads = [threading.Thread(target=run, args=(s,)) for s in SITES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not bad and len({float(w.sum()) for w in want.values()}) == 3
