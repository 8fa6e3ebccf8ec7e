"""Per-site BN as a model (``per_site_model``), and detectron2-style ``CycleBatchNormList`` support."""

import copy
import io
import threading

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn import BNStats, Moments, PopulationStats, collect_stats, use_stats
from shiftbn.sites.routed import PerSiteModel, RoutedBN
from shiftbn.studies.models import SmallCNN
from tests.helpers import assert_same_state, reference_moments, state_of

SITES = ("lab_a", "lab_b", "lab_e")


@pytest.fixture(scope="module")
def setup():
    ds = sb.load("digits-labs", size=8)
    ds = ds.take(np.flatnonzero(np.isin(ds.source_ids, [ds.source_id(s) for s in (*SITES, "lab_c")])))
    model = SmallCNN(width=4, seed=0).eval()
    stats = collect_stats(model, ds.subset(list(SITES)), batch_size=64, progress=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    names = [ds.source_names[i] for i in ds.source_ids]
    return model, stats, ds, x, names


def _mixed_batch(x, names, n=24, seed=0):
    rng = np.random.default_rng(seed)
    pick = rng.choice(np.flatnonzero(np.isin(names, SITES)), size=n, replace=False)
    return x[pick], [names[i] for i in pick]


def _per_site_reference(model, stats, xb, site_names):
    """Each site's samples evaluated alone under use_stats (the definition of per-site BN)."""
    out = torch.empty(len(xb), 10)
    for s in set(site_names):
        mask = torch.tensor([n == s for n in site_names])
        with use_stats(model, stats[s]), torch.no_grad():
            out[mask] = model(xb[mask])
    return out


def test_routing_equals_each_site_alone(setup):
    model, stats, _, x, names = setup
    before = state_of(model)
    routed = sb.sites.per_site_model(model, stats)
    assert routed.sites == SITES and not routed.training
    xb, site_names = _mixed_batch(x, names)
    assert len(set(site_names)) == 3
    ids = torch.tensor([SITES.index(s) for s in site_names])
    with torch.no_grad():
        by_ids, by_names = routed(xb, site=ids), routed(xb, site=site_names)
        one = routed(xb, site="lab_b")
    ref = _per_site_reference(model, stats, xb, site_names)
    torch.testing.assert_close(by_ids, ref, atol=1e-6, rtol=0)
    assert torch.equal(by_ids, by_names)
    assert torch.equal(routed.site_ids(ids.numpy().astype(np.int32)), ids)
    assert torch.equal(routed.site_ids(list(ids.numpy())), ids)  # numpy integers are ids too
    torch.testing.assert_close(one, _per_site_reference(model, stats, xb, ["lab_b"] * len(xb)), atol=1e-6, rtol=0)
    assert_same_state(model, before)  # the user's model is never modified
    assert not any(isinstance(m, RoutedBN) for m in model.modules())


def test_routed_layer_against_float64_reference():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    model = nn.Sequential(bn)
    rng = np.random.default_rng(0)
    means, vars_ = rng.normal(size=(2, 3)) * 5, rng.gamma(2.0, size=(2, 3))
    stats = {f"s{k}": PopulationStats({"0": sb.bn.Population(means[k], vars_[k])}) for k in range(2)}
    routed = sb.sites.per_site_model(model, stats)
    x = torch.randn(4, 3, 2, 2)
    ids = np.array([1, 0, 0, 1])
    with torch.no_grad():
        got = routed(x, site=torch.as_tensor(ids)).double().numpy()
    xd, w, b = x.double().numpy(), np.array([0.5, 2.0, -1.0]), np.array([0.1, 0.0, 3.0])
    m, v = means[ids][:, :, None, None], vars_[ids][:, :, None, None]
    want = (xd - m) / np.sqrt(v + 1e-5) * w[None, :, None, None] + b[None, :, None, None]
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


def test_export_equals_eager(setup):
    model, stats, _, x, names = setup
    routed = sb.sites.per_site_model(model, stats)
    xb, site_names = _mixed_batch(x, names, n=8, seed=1)
    ids = routed.site_ids(site_names)
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(routed, (xb,), {"site": ids}, dynamic_shapes={"x": {0: batch}, "site": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    x2, n2 = _mixed_batch(x, names, n=13, seed=2)
    ids2 = routed.site_ids(n2)
    with torch.no_grad():
        eager = routed(x2, site=ids2)
        assert torch.equal(loaded(x2, site=ids2), eager)


def test_add_site_leaves_others_bit_identical(setup):
    model, stats, ds, x, names = setup
    routed = sb.sites.per_site_model(model, stats)
    before = {k: v.clone() for k, v in routed.state_dict().items() if isinstance(v, torch.Tensor)}
    new_data = ds.subset("lab_c")
    got = routed.add_site("lab_c", new_data, batch_size=64)
    want = collect_stats(model, new_data, batch_size=64, by_source=False, progress=False)["pooled"]
    assert routed.sites == (*SITES, "lab_c")
    for name, layer in routed.routed_layers():
        assert torch.equal(layer.site_mean[:3], before[f"model.{name}.site_mean"])
        assert torch.equal(layer.site_var[:3], before[f"model.{name}.site_var"])
        # the routed model's BN layers take the pre-hook path, the plain model's the C kernel: equal to rounding
        np.testing.assert_allclose(got[name].mean, want[name].mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[name].m2, want[name].m2, rtol=1e-12)
        torch.testing.assert_close(layer.site_mean[3], torch.as_tensor(want[name].mean, dtype=torch.float32))
        torch.testing.assert_close(layer.site_var[3], torch.as_tensor(want[name].var, dtype=torch.float32))
    xb = x[[i for i, n in enumerate(names) if n == "lab_c"][:10]]
    with torch.no_grad(), use_stats(model, want):
        ref = model(xb)
    torch.testing.assert_close(routed(xb, site="lab_c"), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="'lab_c' already exists"):
        routed.add_site("lab_c", new_data)
    with pytest.raises(ValueError, match="mode='eval'"):
        routed.add_site("lab_x", new_data, mode="eval")


def test_state_dict_round_trip(setup):
    model, stats, _, x, names = setup
    routed = sb.sites.per_site_model(model, stats)
    routed.add_site_stats("lab_z", stats["lab_a"])
    buf = io.BytesIO()
    torch.save(routed.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other_base = SmallCNN(width=4, seed=7)  # other weights: everything must come from the state dict
    back = PerSiteModel.from_state_dict(other_base, sd)
    assert back.sites == routed.sites
    xb, site_names = _mixed_batch(x, names, seed=3)
    site_names[0] = "lab_z"
    with torch.no_grad():
        assert torch.equal(back(xb, site=site_names), routed(xb, site=site_names))
    smaller = sb.sites.per_site_model(model, {"lab_a": stats["lab_a"]})
    smaller.load_state_dict(sd)  # a model with fewer sites takes the saved table
    assert smaller.sites == routed.sites
    with pytest.raises(ValueError, match="no site table"):
        PerSiteModel.from_state_dict(other_base, routed.model.state_dict())
    sd_bad = dict(sd)
    sd_bad["_extra_state"] = {"sites": ["only_one"]}
    with pytest.raises(ValueError, match="inconsistent"):
        PerSiteModel.from_state_dict(other_base, sd_bad)


def test_plain_model_is_a_single_site_model(setup):
    model, stats, _, x, _ = setup
    routed = sb.sites.per_site_model(model, stats)
    plain = routed.plain_model("lab_e")
    with torch.no_grad(), use_stats(model, stats["lab_e"]):
        ref = model(x[:6])
    torch.testing.assert_close(plain(x[:6]), ref, atol=1e-6, rtol=0)


def test_bad_input_errors(setup):
    model, stats, _, x, _ = setup
    routed = sb.sites.per_site_model(model, stats)
    xb = x[:4]
    with pytest.raises(ValueError, match=r"unknown site 'lab_q'.*add_site"):
        routed(xb, site=["lab_a", "lab_q", "lab_a", "lab_a"])
    with pytest.raises(ValueError, match=r"site id 3 is out of range.*3 sites"):
        routed(xb, site=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"site id -1 is out of range"):
        routed(xb, site=torch.tensor([0, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"site id 5 is out of range"):
        routed(xb, site=5)
    with pytest.raises(ValueError, match=r"3 site ids for a batch of 4"):
        routed(xb, site=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"2 sites for a batch of 4"):
        routed(xb, site=["lab_a", "lab_b"])
    with pytest.raises(TypeError, match=r"LongTensor.*float32"):
        routed(xb, site=torch.zeros(4))
    with pytest.raises(TypeError, match="site must be"):
        routed(xb, site=None)
    with pytest.raises(RuntimeError, match="without sites"):
        routed.model(xb)
    missing = {s: BNStats({k: v for k, v in stats[s].layers.items() if k != "features.4"}) for s in SITES}
    with pytest.raises(ValueError, match=r"site 'lab_a'.*lack BN layer\(s\) \['features.4'\]"):
        sb.sites.per_site_model(model, missing)
    wrong = {s: BNStats(dict(stats[s].layers)) for s in SITES}
    m = wrong["lab_b"].layers["features.1"]
    wrong["lab_b"].layers["features.1"] = Moments(m.count, m.mean[:2], m.m2[:2])
    with pytest.raises(ValueError, match=r"site 'lab_b'.*features.1.*4 channels.*2"):
        sb.sites.per_site_model(model, wrong)
    with pytest.raises(ValueError, match="non-empty mapping"):
        sb.sites.per_site_model(model, {})
    with pytest.raises(TypeError, match="BNStats or PopulationStats"):
        sb.sites.per_site_model(model, {"a": 3})


def test_threads_route_independently(setup):
    model, stats, _, x, _ = setup
    routed = sb.sites.per_site_model(model, stats)
    xb = x[:16]
    with torch.no_grad():
        want = {s: routed(xb, site=s) for s in SITES}
    got, errors = {}, []

    def run(site):
        try:
            with torch.no_grad():
                for _ in range(20):
                    out = routed(xb, site=site)
                    if not torch.equal(out, want[site]):
                        got[site] = out
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in SITES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not got


def test_deepcopy_has_its_own_route(setup):
    model, stats, _, x, _ = setup
    routed = sb.sites.per_site_model(model, stats)
    twin = copy.deepcopy(routed)
    assert twin._route is not routed._route
    assert all(layer._route is twin._route for _, layer in twin.routed_layers())
    with torch.no_grad():
        assert torch.equal(twin(x[:4], site="lab_a"), routed(x[:4], site="lab_a"))


# --- detectron2's CycleBatchNormList ----------------------------------------------------------


class CycleBatchNormListDouble(nn.ModuleList):
    """A test double with detectron2's CycleBatchNormList behaviour: N BN layers (affine=False) used in
    turn, one per call (an integer position ``_pos``), then a shared affine transform."""

    def __init__(self, length, num_features):
        super().__init__([nn.BatchNorm2d(num_features, affine=False) for _ in range(length)])
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, num_features))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, num_features))
        self._pos = 0

    def forward(self, x):
        out = self[self._pos](x)
        self._pos = (self._pos + 1) % len(self)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class TwoDomainNet(nn.Module):
    """Two inputs per sample (the image and a brighter, pooled view), each with its own BN statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = CycleBatchNormListDouble(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm2 = CycleBatchNormListDouble(2, 4)

    def forward(self, x):
        views = [x, nn.functional.max_pool2d(x, 2) * 3 + 1]
        outs = [self.norm2(self.conv2(torch.relu(self.norm(self.conv(v))))) for v in views]
        return torch.cat([o.mean((2, 3)) for o in outs], 1)


def test_cycle_batchnorm_list_collect_and_restore():
    net = TwoDomainNet()
    batches = list(torch.randn(3, 16, 1, 8, 8))
    before = state_of(net)
    assert [layer.name for layer in sb.bn_layers(net)] == ["norm.0", "norm.1", "norm2.0", "norm2.1"]
    got = collect_stats(net, batches, by_source=False, progress=False)["pooled"]
    ref = reference_moments(net, batches)
    for name, (count, mean, var) in ref.items():
        assert got[name].count == count
        np.testing.assert_allclose(got[name].mean, mean, rtol=0, atol=1e-6)  # float32 BN outputs feed norm2
        np.testing.assert_allclose(got[name].var, var, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got["norm.0"].mean, got["norm.1"].mean)  # the two domains differ
    # sequential mode cuts forwards short; the cycle must stay aligned (stats reproduce themselves)
    seq = collect_stats(net, batches, by_source=False, mode="sequential", progress=False)["pooled"]
    assert net.norm._pos == 0 and net.norm2._pos == 0
    with use_stats(net, seq):
        ref_seq = reference_moments(net, batches, bn_train=False)
    for name, (_, mean, var) in ref_seq.items():
        np.testing.assert_allclose(seq[name].mean, mean, rtol=0, atol=1e-5)
        np.testing.assert_allclose(seq[name].var, var, rtol=1e-5, atol=1e-6)
    assert_same_state(net, before)


def test_snapshot_restores_cycle_position():
    net = TwoDomainNet()

    def fail_after_first(module, args):
        raise RuntimeError("boom")

    h = net.norm2[0].register_forward_pre_hook(fail_after_first)
    with pytest.raises(RuntimeError, match="boom"), sb.bn.preserved(net):
        net(torch.randn(2, 1, 8, 8))  # norm advanced to 1, norm2 never ran
    h.remove()
    assert net.norm._pos == 0


def test_per_site_model_routes_cycle_children():
    net = TwoDomainNet().eval()
    data = {s: [torch.randn(16, 1, 8, 8) * (1 + k) + k for _ in range(2)] for k, s in enumerate(("a", "b"))}
    stats = {s: collect_stats(net, b, by_source=False, progress=False)["pooled"] for s, b in data.items()}
    routed = sb.sites.per_site_model(net, stats)
    xb = torch.cat([data["a"][0][:3], data["b"][0][:3]])
    sites = ["a"] * 3 + ["b"] * 3
    with torch.no_grad():
        got = routed(xb, site=sites)
        for s, sl in (("a", slice(0, 3)), ("b", slice(3, 6))):
            with use_stats(net, stats[s]):
                torch.testing.assert_close(got[sl], net(xb[sl]), atol=1e-6, rtol=0)


def test_from_state_dict_refuses_corrupt_rows_and_other_architectures(setup):
    model, stats, _, _, _ = setup
    routed = sb.sites.per_site_model(model, stats)
    sd = routed.state_dict()
    for bad_value, what in ((float("nan"), "NaN"), (-0.5, "negative")):
        bad = dict(sd)
        table = bad["model.features.1.site_var"].clone()
        table[1, 2] = bad_value
        bad["model.features.1.site_var"] = table
        with pytest.raises(ValueError, match=r"layer 'features.1'.*negative variance for site\(s\) \['lab_b'\]"):
            PerSiteModel.from_state_dict(SmallCNN(width=4, seed=1), bad)
        target = sb.sites.per_site_model(model, stats)
        before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match="lab_b"):
            target.load_state_dict(bad)  # refused before anything is loaded
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items() if k in before), what
    with pytest.raises(ValueError, match=r"does not fit.*shape mismatch.*saved \(3, 4\), model \(3, 8\).*base model"):
        PerSiteModel.from_state_dict(SmallCNN(width=8, seed=0), sd)
    with pytest.raises(ValueError, match=r"does not fit.*missing key"):
        PerSiteModel.from_state_dict(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), sd)
