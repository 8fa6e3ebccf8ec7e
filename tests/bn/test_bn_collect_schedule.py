"""Batches of one sample (refused only where BN itself would be) and the cost of the sequential schedule."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn.batchstats import batch_stats_logits
from shiftbn.bn.reduce import RunningMoments
from tests.helpers import assert_same_state, reference_moments, state_of


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many passes of tiny ops: thread hand-offs would dominate
    yield
    torch.set_num_threads(threads)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                         nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(2)).eval()


def test_one_conv_sample_is_normalized_over_its_positions():
    model = _conv_net()
    x = torch.randn(1, 2, 7, 7) * 3 + 1e4
    model(torch.zeros(2, 2, 7, 7))  # materialize the lazy head
    before = state_of(model)
    stats = sb.collect_stats(model, [x], by_source=False, progress=False)["pooled"]
    assert_same_state(model, before)
    with torch.no_grad():
        first = model[0](x).double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)  # no BN before it
    assert stats["1"].count == 25
    np.testing.assert_allclose(stats["1"].mean, first.mean(1), rtol=1e-9)
    np.testing.assert_allclose(stats["1"].var, first.var(1), rtol=1e-9)
    ref = reference_moments(model, [x])  # torch's train-mode BN accepts one sample with positions
    np.testing.assert_allclose(stats["4"].var, ref["4"][2], rtol=1e-5)


def test_one_value_per_channel_is_refused_with_the_layer_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"one sample \(source 'pooled'\) gives BN layer '1' one value per "
                                         r"channel \(input shape \(1, 4\)\)"):
        sb.collect_stats(model, [torch.randn(4, 3), torch.randn(1, 3)], by_source=False, progress=False)
    assert_same_state(model, before)
    # a (N, C, L) input of one sample has L values per channel: accepted, as by BN
    seq = nn.Sequential(nn.BatchNorm1d(2)).double()
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    got = sb.collect_stats(seq, [x], by_source=False, progress=False)["pooled"]["0"]
    np.testing.assert_allclose(got.var, x[0].numpy().var(1), rtol=1e-12)


def test_prediction_time_bn_takes_one_conv_sample_and_refuses_one_value():
    model = _conv_net()
    x = torch.randn(1, 2, 7, 7)
    out = batch_stats_logits(model, x, batch_size=4, seed=0)
    ref = _conv_net()
    ref(torch.zeros(2, 2, 7, 7))
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"a batch of 1 sample\(s\) gives a BN layer one value per channel"):
        batch_stats_logits(mlp, torch.randn(1, 3), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="data is empty"):
        batch_stats_logits(mlp, torch.randn(0, 3), batch_size=4, seed=0)


class _Counted(nn.Sequential):
    """A chain of Linear-BN1d blocks whose head counts the forwards that reach it."""

    def __init__(self, depth=6, width=4):
        torch.manual_seed(0)
        mods = []
        for _ in range(depth):
            mods += [nn.Linear(width, width), nn.BatchNorm1d(width)]
        super().__init__(*mods)
        self.reached = 0

    def forward(self, x):
        out = super().forward(x)
        self.reached += 1
        return out


def test_sequential_runs_one_full_forward_and_truncates_every_other():
    model = _Counted()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g) + k % 2, torch.zeros(8), torch.full((8,), k % 2)) for k in range(6)]
    stats = sb.collect_stats(model, batches, mode="sequential", progress=False)
    # pass 1 runs its first forward in full (to learn the call order), then measures the first layer only;
    # pass p measures layer p and stops there: only that first forward reaches the head
    assert model.reached == 1 and stats.passes == 6
    for k in ("0", "1"):  # sources interleaved batch by batch: the stored statistics follow the source
        with sb.use_stats(model, stats[k]):
            ref = reference_moments(model, [b[0] for b in batches if int(b[2][0]) == int(k)], bn_train=False)
        for name, (count, mean, var) in ref.items():
            assert stats[k][name].count == count
            np.testing.assert_allclose(stats[k][name].var, var, rtol=1e-5)
            np.testing.assert_allclose(stats[k][name].mean, mean, rtol=1e-5, atol=1e-6)
    grouped = sorted(batches, key=lambda b: int(b[2][0]))
    again = sb.collect_stats(model, grouped, mode="sequential", progress=False)
    for k in ("0", "1"):
        for name in stats[k]:
            np.testing.assert_allclose(again[k][name].var, stats[k][name].var, rtol=1e-9)
            np.testing.assert_allclose(again[k][name].mean, stats[k][name].mean, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("positions", [(3, 5), (48, 48)])  # both fused kernels: flat and row-first (L >= 2048)
def test_fused_batches_are_exact_from_the_first_one(positions):
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(3, 2, *positions, generator=g) * (1 + k) + 1e4 - k for k in range(3)]
    ref = np.concatenate([b.double().numpy() for b in batches]).transpose(1, 0, 2, 3).reshape(2, -1)
    acc = RunningMoments()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the kernel must build here, not fall back
        for b in batches:
            c, mean, var = acc.add(b, fused=True)
            seen.append((c, mean.numpy().copy(), var.numpy().copy()))
    for b, (c, mean, var) in zip(batches, seen, strict=True):  # each batch's own moments, for BN
        own = b.double().numpy().transpose(1, 0, 2, 3).reshape(2, -1)
        assert c == own.shape[1]
        np.testing.assert_allclose(mean, own.mean(1), rtol=1e-12)
        np.testing.assert_allclose(var, own.var(1), rtol=1e-9)
    got = acc.result()
    np.testing.assert_allclose(got.mean, ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(got.var, ref.var(1), rtol=1e-9)


class _CountingDataset(torch.utils.data.Dataset):
    """Items (x, y) whose reads are counted per index."""

    def __init__(self, n=24, features=4):
        self.x = torch.randn(n, features, generator=torch.Generator().manual_seed(5)) * 2 + 3
        self.reads = np.zeros(n, dtype=int)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.x[i], 0


def test_sequential_loads_the_data_once_when_it_fits_the_cache():
    model = _Counted(depth=4)
    results = {}
    for budget in (1 << 20, 0, 24 * 4 * 4 - 1):  # fits; off; one byte short of the data
        ds = _CountingDataset()
        results[budget] = sb.collect_stats(model, ds, batch_size=8, mode="sequential", cache_bytes=budget,
                                           progress=False)["pooled"]
        assert results[budget].num_samples == 24
        assert set(ds.reads) == ({1} if budget == 1 << 20 else {4}), budget  # 4 passes
    for name in results[0]:
        for budget in results:
            np.testing.assert_array_equal(results[budget][name].var, results[0][name].var)
    with pytest.raises(ValueError, match="cache_bytes must be an integer >= 0"):
        sb.collect_stats(model, _CountingDataset(), cache_bytes=-1, progress=False)


class _InPlace(nn.Module):
    """Writes into its input, as an in-place normalization would."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        return self.body(x.mul_(2.0))


def test_replayed_batches_are_copies():
    ds = _CountingDataset()
    cached = sb.collect_stats(_InPlace(), ds, batch_size=8, mode="sequential", progress=False)["pooled"]
    fresh = sb.collect_stats(_InPlace(), _CountingDataset(), batch_size=8, mode="sequential", cache_bytes=0,
                             progress=False)["pooled"]
    for name in fresh:
        np.testing.assert_array_equal(cached[name].mean, fresh[name].mean)
        np.testing.assert_array_equal(cached[name].var, fresh[name].var)
