"""prior:N against an independent re-implementation of the published BayesianBatchNorm logic."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import shiftbn as sb
from shiftbn.adapt import Prior, parse_strategy, prior_batch_logits, prior_stats
from shiftbn.bn.batchstats import batch_stats_logits
from tests.helpers import assert_same_state, state_of


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    with torch.no_grad():  # source statistics and affine parameters that are not the defaults
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _target(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 1, 8, 8, generator=g) + 1.5  # a shifted, rescaled target domain


class _RefBayesBN(nn.Module):
    """The published logic, written here: the target's batch statistics from a momentum-1 BN in train
    mode (as robusta does: unbiased variance), mixed linearly with the source's running statistics,
    weight ``prior``. ``unbiased=False``: the population variance instead (what shiftbn uses)."""

    def __init__(self, layer, prior, unbiased=True):
        super().__init__()
        self.layer, self.prior, self.unbiased = layer, prior, unbiased
        self.norm = nn.BatchNorm2d(layer.num_features, affine=False, momentum=1.0).train()
        self.seen = []

    def forward(self, x):
        self.norm(x)
        target_var = self.norm.running_var if self.unbiased else x.double().var((0, 2, 3), unbiased=False).float()
        mean = self.prior * self.layer.running_mean + (1 - self.prior) * self.norm.running_mean
        var = self.prior * self.layer.running_var + (1 - self.prior) * target_var
        self.seen.append((mean.clone(), var.clone()))
        return F.batch_norm(x, mean, var, self.layer.weight, self.layer.bias, False, 0.0, self.layer.eps)


def _reference(net, prior, unbiased=True):
    ref = copy.deepcopy(net)
    swapped = []
    for name, m in list(ref.named_children()):
        if isinstance(m, nn.BatchNorm2d):
            bb = _RefBayesBN(m, prior, unbiased)
            setattr(ref, name, bb)
            swapped.append((name, bb))
    return ref, swapped


def _groups(n, batch, seed):
    order = np.random.default_rng(seed).permutation(n)
    return np.array_split(order, -(-n // batch))


@pytest.mark.parametrize("n_prior", [0.0, 16.0, 64.0])
def test_per_batch_prior_matches_the_reference(n_prior):
    net, x, batch = _net(), _target(), 32
    labels = torch.arange(len(x)) % 3
    before = state_of(net)
    ours = prior_batch_logits(net, x, n_prior, batch, seed=3)
    assert_same_state(net, before)
    ref, _ = _reference(net, n_prior / (n_prior + batch))
    exact, _ = _reference(net, n_prior / (n_prior + batch), unbiased=False)
    want, want_exact = torch.empty_like(ours), torch.empty_like(ours)
    with torch.no_grad():
        for idx in _groups(len(x), batch, 3):
            want[idx] = ref(x[idx])
            want_exact[idx] = exact(x[idx])
    torch.testing.assert_close(ours, want_exact, rtol=1e-5, atol=1e-5)
    # the reference's target variance is unbiased (count/(count-1), count = 32 x 64): relative 5e-4
    torch.testing.assert_close(ours, want, rtol=2e-3, atol=2e-3)
    agree = (ours.argmax(1) == want.argmax(1)).float().mean().item()
    acc_ours, acc_ref = [(o.argmax(1) == labels).float().mean().item() for o in (ours, want)]
    assert agree >= 0.995 and abs(acc_ours - acc_ref) <= 0.005


def test_few_shot_statistics_match_the_reference_and_both_paths_agree():
    net, x = _net(), _target(40)
    n_prior = 16.0
    w = n_prior / (n_prior + len(x))
    one = prior_stats(net, x, n_prior, batch_size=len(x))
    layered = prior_stats(net, x, n_prior, batch_size=7)  # one truncated pass per layer, batches of 7
    assert one.num_samples == layered.num_samples == len(x)
    exact, swapped_exact = _reference(net, w, unbiased=False)
    robusta, swapped_robusta = _reference(net, w)
    with torch.no_grad():
        exact(x)  # one batch of all n samples: every layer sees its input as at inference
        robusta(x)
    for (name, bb), (_, rb) in zip(swapped_exact, swapped_robusta, strict=True):
        mean, var = (t.double().numpy() for t in bb.seen[0])
        np.testing.assert_allclose(one[name].mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(one[name].var, var, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layered[name].mean, one[name].mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(layered[name].var, one[name].var, rtol=1e-6, atol=1e-7)
        # robusta's unbiased target variance: a factor count/(count-1) = 1 + 4e-4 (count = 40 x 64)
        r_mean, r_var = (t.double().numpy() for t in rb.seen[0])
        np.testing.assert_allclose(one[name].mean, r_mean, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(one[name].var, r_var, rtol=2e-3, atol=2e-4)


def test_limits_zero_prior_is_inference_consistent_adabn_and_huge_prior_is_source():
    net, x = _net(), _target(48)
    # N = 0: the target's own statistics, each layer measured below layers using theirs
    zero = prior_stats(net, x, 0.0, batch_size=16)
    seq = sb.collect_stats(net, TensorDataset(x), batch_size=16, mode="sequential", progress=False)["pooled"]
    for name in seq.layers:
        np.testing.assert_allclose(zero[name].mean, seq[name].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(zero[name].var, seq[name].var, rtol=1e-5, atol=1e-6)
    # ...which differs in deeper layers from statistics collected with batch statistics upstream
    batchmode = sb.collect_stats(net, TensorDataset(x), batch_size=16, mode="batch", progress=False)["pooled"]
    assert not np.allclose(zero["4"].var, batchmode["4"].var, rtol=1e-3)
    np.testing.assert_allclose(zero["1"].var, batchmode["1"].var, rtol=1e-6)  # the first layer agrees
    torch.testing.assert_close(prior_batch_logits(net, x, 0.0, 16, seed=5), batch_stats_logits(net, x, 16, seed=5),
                               rtol=1e-4, atol=1e-4)
    # N -> infinity: the source statistics, the model as it is
    huge = prior_stats(net, x, 1e12)
    src = sb.buffer_stats(net)
    for name in src.layers:
        np.testing.assert_allclose(huge[name].mean, src[name].mean, atol=1e-8)
        np.testing.assert_allclose(huge[name].var, src[name].var, rtol=1e-8)
    with torch.no_grad():
        plain = net(x)
    torch.testing.assert_close(prior_batch_logits(net, x, 1e12, 16, seed=0), plain, rtol=1e-5, atol=1e-5)


def test_model_restored_bit_for_bit_also_on_errors():
    net = _net()
    net.train()
    before = state_of(net)
    prior_stats(net, _target(30), 4.0, batch_size=8)
    assert_same_state(net, before)
    with pytest.raises(RuntimeError):
        prior_batch_logits(net, torch.randn(6, 2, 8, 8), 4.0, 4, seed=0)  # wrong channel count: conv raises
    with pytest.raises(RuntimeError):
        prior_stats(net, torch.randn(6, 2, 8, 8), 4.0, batch_size=4)
    assert_same_state(net, before)
    untracked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="keep no running statistics"):
        prior_stats(untracked, _target(8), 4.0)


def test_spec_forms_and_names():
    assert parse_strategy("prior:16").name == "prior:16" and parse_strategy("prior:16").batch == 64
    p = parse_strategy("prior:16:32:k=3")
    assert (p.batch, p.groupings, p.samples, p.name) == (32, 3, None, "prior:16:32:k=3")
    few = parse_strategy("prior:16@100")
    assert (few.samples, few.groupings, few.name) == (100, 1, "prior:16@100")
    assert parse_strategy("prior:2@all").samples == "all"
    with pytest.raises(ValueError, match="only 10 calibration samples"):
        sb.adapt.prior.take_samples(torch.zeros(10, 1), 11, seed=0)
    assert Prior(16).cache_key(None, "a") is None and Prior(16, samples=8).cache_key(None, "a") is not None


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_per_batch_prior_matches_float64_moments_per_call(offset):
    # the mixer reads each batch's moments in float32 passes (fast_batch_moments) into reused buffers and
    # converts the source statistics once; this is the plain form (a fresh float64 copy of every BN input and
    # a numpy -> tensor conversion per BN call), which it must match within 1e-6, also for inputs far off zero
    from shiftbn._torch import batch_chunks
    from shiftbn.bn.moments import batch_moments

    net, x, n_prior = _net(), _target(50) + offset, 16.0
    ours = prior_batch_logits(net, x, n_prior, 16, seed=4)
    ref = copy.deepcopy(net)
    source = {m: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
              for m in ref.modules() if isinstance(m, nn.BatchNorm2d)}

    def mix(m, args):
        count, mean, m2 = batch_moments(args[0])
        w = n_prior / (n_prior + args[0].shape[0])
        sm, sv = (torch.as_tensor(a, dtype=torch.float64) for a in source[m])
        m.running_mean.copy_(w * sm + (1 - w) * mean)
        m.running_var.copy_(w * sv + (1 - w) * (m2 / count))

    for m in source:
        m.register_forward_pre_hook(mix)
    want = torch.empty_like(ours)
    with torch.no_grad():
        for idx in batch_chunks(len(x), 16, 4):
            want[idx] = ref(x[idx])
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
