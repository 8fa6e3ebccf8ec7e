import copy

import numpy as np
import pytest
import torch
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn
from torch.optim.swa_utils import update_bn

import shiftbn as sb
from tests.helpers import reference_moments


def _bn_model(channels=3):
    return nn.Sequential(nn.BatchNorm2d(channels))


def _single_source_batches(offset=0.0, seed=0):
    """Batches of 16 from three sources with means 0, 5, 10 (large between-batch variance)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 4, 4, generator=g) + 5.0 * k + offset).float() for k in range(3) for _ in range(4)]


def test_precise_bn_single_source_batches_exact_and_swa_is_not():
    batches = _single_source_batches()
    _, mean, var = reference_moments(_bn_model(), batches)["0"]
    ours = _bn_model()
    stats = sb.precise_bn(ours, batches, num_samples=None, progress=False)
    np.testing.assert_allclose(stats["0"].var, var, rtol=1e-9)
    np.testing.assert_allclose(ours[0].running_var.numpy(), var, rtol=1e-6)
    np.testing.assert_allclose(ours[0].running_mean.numpy(), mean, rtol=1e-6, atol=1e-6)

    swa = _bn_model()
    update_bn([(b,) for b in batches], swa)
    # swa averages within-batch (unbiased) variances: it misses the variance between batch means
    swa_var = swa[0].running_var.numpy()
    assert np.all(swa_var < 0.2 * var)
    assert np.allclose(swa_var, 1.0, atol=0.2)
    assert var.min() > 15  # true pooled variance: 1 + var of {0, 5, 10} = 1 + 16.7


def test_agrees_with_fvcore_on_centered_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    batches = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    peer = copy.deepcopy(model).train()
    update_bn_stats(peer, batches, num_iters=len(batches))
    ours = copy.deepcopy(model)
    sb.precise_bn(ours, batches, num_samples=None, progress=False)
    for i in (1, 4):
        np.testing.assert_allclose(ours[i].running_mean.numpy(), peer[i].running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[i].running_var.numpy(), peer[i].running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("offset, fvcore_breaks", [(1e3, "off"), (1e4, "negative")])
def test_exact_where_fvcore_fails_at_large_offsets(offset, fvcore_breaks):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 3, 8, 8, generator=g) + offset).float() for _ in range(20)]
    _, _, var = reference_moments(_bn_model(), batches)["0"]
    peer = _bn_model().train()
    update_bn_stats(peer, batches, num_iters=len(batches))
    peer_var = peer[0].running_var.numpy()
    if fvcore_breaks == "negative":
        assert (peer_var < 0).any()  # fvcore 0.1.5 gives -16 for unit-variance data
    else:
        assert np.max(np.abs(peer_var / var - 1)) > 0.05
    ours = _bn_model()
    stats = sb.precise_bn(ours, batches, num_samples=None, progress=False)
    np.testing.assert_allclose(stats["0"].var, var, rtol=1e-9)
    np.testing.assert_allclose(ours[0].running_var.numpy(), var, rtol=1e-6)


def test_precise_bn_caps_samples_and_keeps_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    model[1].momentum = 0.3
    data = torch.utils.data.TensorDataset(torch.randn(500, 4))
    stats = sb.precise_bn(model, data, num_samples=100, batch_size=32, progress=False)
    assert stats.num_samples == 100 and stats["1"].count == 100
    assert model.training and model[1].momentum == 0.3
    assert int(model[1].num_batches_tracked) == 0


def test_precise_bn_reads_dict_items_through_keys():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 4, 4, generator=g) * 2 + 5

    class Items(torch.utils.data.Dataset):  # a map-style dataset of tuples or of dicts
        def __init__(self, as_dict):
            self.as_dict = as_dict

        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"img": x[i], "label": 0} if self.as_dict else (x[i], 0)

    tuples, dicts = Items(False), Items(True)
    a, b = _bn_model(), _bn_model()
    b.load_state_dict(a.state_dict())
    want = sb.precise_bn(a, tuples, num_samples=None, batch_size=8, progress=False)
    with pytest.raises((TypeError, ValueError, KeyError)):  # without keys a dict item has no input to find
        sb.precise_bn(copy.deepcopy(b), dicts, num_samples=None, batch_size=8, progress=False)
    got = sb.precise_bn(b, dicts, num_samples=None, batch_size=8, keys=sb.ItemKeys(input="img"), progress=False)
    for layer in want.layers:
        np.testing.assert_array_equal(got[layer].mean, want[layer].mean)
        np.testing.assert_array_equal(got[layer].var, want[layer].var)
    for (ka, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), ka
