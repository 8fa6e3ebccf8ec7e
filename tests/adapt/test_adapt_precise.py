"""PreciseBN's batch composition: exact for the first BN layer, not for deeper ones (use mode="sequential")."""

import numpy as np
import torch
from torch.utils.data import TensorDataset

import shiftbn as sb
from tests.adapt.test_prior import _net
from tests.helpers import capture_bn_inputs, moments_of


def _two_sources(n=48):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 1, 8, 8, generator=g)
    b = 3.0 * torch.randn(n, 1, 8, 8, generator=g) + 2.0  # a strongly shifted second source
    x = torch.cat([a, b])
    return x, sb.SourceTaggedDataset(TensorDataset(x, torch.zeros(2 * n, dtype=torch.long)), [0] * n + [1] * n,
                                     source_names=["a", "b"])


def _inference_moments(net, stats, x):
    """Moments of every BN input when the model runs in eval mode with ``stats`` loaded."""
    with sb.use_stats(net, stats), capture_bn_inputs(net) as seen, torch.no_grad():
        net(x)
    return {name: moments_of(parts) for name, parts in seen.items()}


def test_precise_is_exact_for_the_first_layer_only_and_sequential_is_inference_consistent():
    net, (x, ds) = _net(), _two_sources()
    single = sb.collect_stats(net, ds, batch_size=16, progress=False).pooled()  # single-source batches
    mixed = sb.collect_stats(net, ds, by_source=False, batch_size=16, progress=False)["pooled"]
    seq = sb.collect_stats(net, ds, by_source=False, batch_size=16, mode="sequential", progress=False)["pooled"]
    with capture_bn_inputs(net) as seen, torch.no_grad():
        net(x)  # the first layer's input does not depend on any BN layer
    _, mean1, var1 = moments_of(seen["1"])
    for stats in (single, mixed, seq):
        np.testing.assert_allclose(stats["1"].mean, mean1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats["1"].var, var1, rtol=1e-6)
    # deeper layers: single-source batches give statistics that never occur at inference
    at_inference = _inference_moments(net, single, x)
    assert np.abs(single["4"].var / at_inference["4"][2] - 1).max() > 0.05
    assert np.abs(single["4"].var / mixed["4"].var - 1).max() > 0.05  # and they depend on the composition
    # the sequential mode's statistics are exactly those the model sees with them loaded
    consistent = _inference_moments(net, seq, x)
    for name in ("4", "7"):
        np.testing.assert_allclose(seq[name].mean, consistent[name][1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seq[name].var, consistent[name][2], rtol=1e-5)
