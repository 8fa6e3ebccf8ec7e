"""collect_stats edge cases: caps with samplers, integer types, untracked BN, custom buffers, deep chains."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.data import ArrayDataset
from tests.helpers import assert_same_state, reference_moments, state_of


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def _tagged(n_per=(12, 10)):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(n_per), 3)).astype(np.float32)
    src = np.repeat(["a", "b"], n_per)
    return sb.SourceTaggedDataset(ArrayDataset(x, np.zeros(len(x))), src)


def test_num_samples_caps_each_source_with_a_sampler_too():
    ds = _tagged()
    sampler = sb.SourceBatchSampler(ds.source_ids, batch_size=4, mode="single", seed=0)
    full = sb.collect_stats(_net(), ds, sampler=sampler, progress=False)
    assert [full[s].num_samples for s in full] == [12, 10]
    capped = sb.collect_stats(_net(), ds, sampler=sampler, num_samples=6, progress=False)
    assert [capped[s].num_samples for s in capped] == [6, 6]
    assert capped["a"]["1"].count == 6
    # in batch mode a cut of one sample (no batch statistics) joins the source's previous batch: the
    # cap is met exactly, never with a one-sample batch; eval mode keeps the cut as its own batch
    five = sb.collect_stats(_net(), ds, sampler=sampler, num_samples=5, progress=False)
    assert [five[s].num_samples for s in five] == [5, 5]
    five_eval = sb.collect_stats(_net(), ds, sampler=sampler, num_samples=5, mode="eval", progress=False)
    assert [five_eval[s].num_samples for s in five_eval] == [5, 5]


@pytest.mark.parametrize("seed", range(4))
def test_num_samples_is_met_exactly_when_the_cut_would_be_one_sample(seed):
    # 12 samples a source in batches of 8 and 4: when the 4 comes first, the cap of 5 ends in a cut of one
    ds = _tagged((12, 12))
    sampler = sb.SourceBatchSampler(ds.source_ids, 8, mode="single", seed=seed)
    model = _net()
    stats = sb.collect_stats(model, ds, sampler=sampler, num_samples=5, progress=False)
    for i, name in enumerate(ds.source_names):
        stream = [b for b in sampler if ds.source_ids[b[0]] == i]
        first = stream[0] if len(stream[0]) >= 5 else stream[0] + stream[1][: 5 - len(stream[0])]
        want = reference_moments(model, [torch.stack([ds[j][0] for j in first[:5]])])
        assert stats[name].num_samples == 5
        for layer, (count, mean, var) in want.items():
            got = stats[name][layer]
            assert got.count == count == 5
            np.testing.assert_allclose(got.mean, mean, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got.var, var, rtol=1e-6, atol=1e-7)


def test_numpy_integers_accepted_and_bad_sizes_named():
    ds = _tagged()
    stats = sb.collect_stats(_net(), ds, batch_size=np.int64(4), num_samples=np.int32(6), progress=False)
    assert [stats[s].num_samples for s in stats] == [6, 6]
    with pytest.raises(TypeError, match=r"batch_size.*2\.5"):
        sb.collect_stats(_net(), ds, batch_size=2.5, progress=False)
    with pytest.raises(TypeError, match="num_samples"):
        sb.collect_stats(_net(), ds, num_samples=5.5, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        sb.collect_stats(_net(), ds, batch_size=np.int64(0), progress=False)


def test_empty_batch_is_not_called_one_sample():
    batches = [torch.randn(4, 3), torch.randn(0, 3)]
    with pytest.raises(ValueError, match=r"empty batch \(0 samples") as info:
        sb.collect_stats(_net(), batches, progress=False)
    assert "one sample" not in str(info.value)
    with pytest.raises(ValueError, match="one sample"):
        sb.collect_stats(_net(), [torch.randn(1, 3)], progress=False)


def _untracked_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2),
                         nn.BatchNorm1d(2))


def test_untracked_bn_refused_where_it_would_mislead():
    model = _untracked_net()
    before = state_of(model)
    x = [torch.randn(8, 3), torch.randn(8, 3)]
    with pytest.raises(ValueError, match=r"mode='eval'.*\['1'\].*track_running_stats=False"):
        sb.collect_stats(model, x, by_source=False, mode="eval", progress=False)
    with pytest.raises(ValueError, match=r"freeze_bn.*\['1'\].*batch statistics"):
        sb.freeze_bn(model)
    assert_same_state(model, before)
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())
    # after precise_bn the layer has population statistics: freezing then means what it says
    sb.precise_bn(model, x, num_samples=None, progress=False)
    model.train()
    with torch.no_grad(), sb.freeze_bn(model):
        h = model[0](x[0])
        bn = model[1]
        want = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(bn(h), want)


class _Counting(nn.Module):
    """A module whose forward updates a custom (non-BN) buffer, as some normalizers and EMAs do."""

    def __init__(self):
        super().__init__()
        self.net = _net()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_max", torch.zeros(3))

    def forward(self, x):
        self.calls += 1
        self.running_max.copy_(torch.maximum(self.running_max, x.abs().amax(0)))
        return self.net(x)


def test_every_buffer_restored_bit_for_bit():
    model = _Counting()
    model.train()
    before = state_of(model)
    calls_obj = model.calls
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, 3, generator=g) * 5 for _ in range(3)]
    for mode in ("batch", "sequential", "eval"):
        sb.collect_stats(model, batches, by_source=False, mode=mode, progress=False)
        assert_same_state(model, before)
    with sb.use_stats(model, sb.collect_stats(model, batches, by_source=False, progress=False)["pooled"]):
        model(batches[0])
    with sb.bn.preserved(model):
        model(batches[0])
    assert_same_state(model, before)
    assert model.calls is calls_obj and int(model.calls) == 0


def _chain(depth=40, width=4):
    torch.manual_seed(0)
    mods = []
    for _ in range(depth):
        mods += [nn.Linear(width, width), nn.BatchNorm1d(width)]
    return nn.Sequential(*mods)


def test_sequential_converges_on_a_40_layer_chain():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 41 passes of tiny ops: thread hand-offs would dominate
    try:
        model = _chain()
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(32, 4, generator=g) for _ in range(2)]
        before = state_of(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stats = sb.collect_stats(model, batches, by_source=False, mode="sequential", progress=False)
        assert_same_state(model, before)
        # pass p measures layer p with every layer before it final: L passes make a chain exact by
        # construction, and no confirming pass is run
        assert stats.passes == 40
        # inference consistency: with the statistics loaded, every layer's input has exactly them
        with sb.use_stats(model, stats["pooled"]):
            ref = reference_moments(model, batches, bn_train=False)
        for name, (_, mean, var) in ref.items():
            np.testing.assert_allclose(stats["pooled"][name].var, var, rtol=1e-4)
            np.testing.assert_allclose(stats["pooled"][name].mean, mean, rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


class _Looped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.lin2, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin2(torch.relu(self.bn(self.lin(x)))) * 3.0 + 1.0)


def test_sequential_non_convergence_names_the_layer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _chain(depth=6)
        batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(1))]
        with pytest.warns(UserWarning, match=r"did not converge in 3 passes: layer '9' and the 1 BN module\(s\) "
                                             r"called after it were never measured.*max_passes >= 5"):
            sb.collect_stats(model, batches, by_source=False, mode="sequential", max_passes=3, progress=False)
        looped = _Looped()  # one BN applied twice in a row: a genuine fixpoint, reached geometrically
        with pytest.warns(UserWarning, match=r"did not converge in 2 passes: layer 'bn@1' \(source 'pooled'\) "
                                             r"still changed by"):
            sb.collect_stats(looped, batches, by_source=False, mode="sequential", max_passes=2, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default bound leaves room for such loops
            stats = sb.collect_stats(looped, batches, by_source=False, mode="sequential", progress=False)
        assert 3 < stats.passes < 1 + 32
    finally:
        torch.set_num_threads(threads)


def test_preserved_restores_buffers_replaced_added_or_resized():
    model = _Counting()
    before = state_of(model)
    running_max = model.running_max
    with sb.bn.preserved(model):
        model.running_max.resize_(7).fill_(1.0)
        model.calls = torch.ones((), dtype=torch.long)  # a new tensor object under the same name
        model.register_buffer("extra", torch.ones(2))
        model.net[1].running_var.mul_(3.0)
    assert_same_state(model, before)
    assert model.running_max is running_max and not hasattr(model, "extra")
