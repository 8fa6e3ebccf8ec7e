"""Online Tent against a re-implementation of the official logic (github.com/DequanWang/tent)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.adapt import Tent, parse_strategy, tent_offline_logits, tent_online_logits
from tests.helpers import assert_same_state, state_of


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Linear(8, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _stream(n=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, 1, 6, 6, generator=g) + 0.5


def _official(net, x, batch, seed, steps=1, episodic=False):
    """The official recipe, written here: configure_model, collect_params (BatchNorm2d weight and bias),
    Adam(lr 1e-3, betas (0.9, 0.999), wd 0), forward_and_adapt per batch (outputs before the update)."""
    model = copy.deepcopy(net)
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    order = np.random.default_rng(seed).permutation(len(x))
    out = torch.empty(len(x), 3)
    for idx in np.array_split(order, -(-len(x) // batch)):
        if episodic:
            model.load_state_dict(state[0], strict=True)
            opt.load_state_dict(state[1])
        for _ in range(steps):
            with torch.enable_grad():
                outputs = model(x[idx])
                loss = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1).mean(0)
                loss.backward()
                opt.step()
                opt.zero_grad()
        out[idx] = outputs.detach()
    return out


@pytest.mark.parametrize("steps, episodic", [(1, False), (3, False), (2, True)])
def test_online_tent_equals_the_official_logic(steps, episodic):
    net, x = _net(), _stream()
    before = state_of(net)
    ours = tent_online_logits(net, x, 16, seed=4, steps=steps, episodic=episodic)
    assert_same_state(net, before)
    want = _official(net, x, 16, 4, steps, episodic)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
    # adaptation happened: later batches differ from plain prediction-time BN
    plain = sb.adapt.tent.batch_stats_logits(net, x, 16, 4)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_episodic_single_step_is_prediction_time_bn():
    net, x = _net(), _stream()
    ours = tent_online_logits(net, x, 16, seed=2, episodic=True)
    torch.testing.assert_close(ours, sb.adapt.tent.batch_stats_logits(net, x, 16, 2), rtol=1e-6, atol=1e-6)


def test_only_batchnorm2d_adapts_and_errors_are_clear():
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    with pytest.raises(ValueError, match="BatchNorm2d.*tent-offline"):
        tent_online_logits(net, _stream(), 16, seed=0)
    out = tent_offline_logits(net, _stream(), _stream(20, 3), steps=2, batch_size=8, seed=0)  # every BN layer
    assert out.shape == (20, 3) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tent-offline:10"):
        parse_strategy("tent:10")
    with pytest.raises(ValueError, match="steps >= 1"):
        tent_online_logits(_net(), _stream(), 16, seed=0, steps=0)


def test_model_restored_on_errors_and_names():
    net = _net()
    net.train()
    before = state_of(net)
    with pytest.raises(RuntimeError):
        tent_online_logits(net, torch.randn(8, 2, 6, 6), 4, seed=0)  # wrong channels: the conv raises
    assert_same_state(net, before)
    assert parse_strategy("tent").name == "tent" and parse_strategy("tent-episodic").episodic
    assert parse_strategy("tent:k=2").groupings == 2 and parse_strategy("tent-offline:7").name == "tent-offline:7"
    assert Tent().groupings == 5 and Tent().stats_source(None, "a") == "batch"
