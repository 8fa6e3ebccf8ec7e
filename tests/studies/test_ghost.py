import copy

import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.data.arrays import ArrayDataset
from shiftbn.studies.ghost import ghost_norm, ghost_ready
from shiftbn.studies.minibatch import exact_batches, outputs_of_batches
from shiftbn.studies.models import MLP, SmallCNN
from shiftbn.studies.training import train


def _loop(model, x, g):
    return torch.cat([model(x[i:i + g]) for i in range(0, len(x), g)])


@pytest.mark.parametrize(("make", "shape", "g", "momentum"), [
    (lambda: MLP(12, 3, hidden=8), (16, 12), 2, 0.1),
    (lambda: MLP(12, 3, hidden=8), (16, 12), 4, None),
    (lambda: SmallCNN(1, 3, width=2), (8, 1, 6, 6), 2, 0.1),
])
def test_grouped_bn_equals_one_call_per_ghost_batch(make, shape, g, momentum):
    # outputs, input and parameter gradients, running buffers and batch counts: as if called per group
    # (float64: the same math up to rounding; in float32 a 2-sample BN amplifies rounding to ~1e-5 in gradients)
    torch.manual_seed(0)
    ref = make().double()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    fast = copy.deepcopy(ref)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = _loop(ref.train(), xr, g)
    with ghost_norm(fast.train(), g):
        out_fast = fast(xf)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(out_ref)
    (out_ref * w).sum().backward()
    (out_fast * w).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-10, rtol=1e-10)
    for pf, pr in zip(fast.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, atol=1e-10, rtol=1e-10)
    for (name, bf), br in zip(fast.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(bf, br, atol=1e-10, rtol=1e-10, msg=name)
    assert "forward" not in vars(next(m for m in fast.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)))


def test_ghost_norm_restores_forward_on_error_and_refuses_custom_models():
    net = MLP(4, 2, hidden=4).train()
    with pytest.raises(ValueError, match="does not split"), ghost_norm(net, 4):
        net(torch.randn(6, 4))
    assert all("forward" not in vars(m) for m in net.modules())
    with pytest.raises(ValueError, match="ghost size must be an int >= 2"), ghost_norm(net, 1):
        pass

    class Mixer(nn.Module):  # couples samples outside BN: grouping would change its numbers
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(x - x.mean(0))

    assert ghost_ready(net) and not ghost_ready(Mixer())
    with pytest.raises(ValueError, match="once per ghost batch"), ghost_norm(Mixer(), 2):
        pass


def test_training_with_ghost_batches_calls_the_model_once_per_sgd_batch_with_the_loops_numbers():
    # the fast path is taken (one forward per step, counted by a hook) and trains to the loop's weights
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(256, 10)), dtype=torch.float32)
    y = (x[:, 0] > 0).long().numpy()
    ds = sb.SourceTaggedDataset(ArrayDataset(x, y), np.zeros(256, dtype=np.int64), y)
    fast, slow = MLP(10, 2, hidden=8), MLP(10, 2, hidden=8)
    calls = []
    fast.register_forward_hook(lambda *a: calls.append(1))
    train(fast, ds, steps=5, batch_size=32, ghost_batch=4, lr=0.05, progress=False)
    assert len(calls) == 5
    # the reference: the same model wrapped in a module ghost_ready does not know, so train loops per ghost batch
    wrapped = nn.Sequential(slow, nn.Dropout(0.0))
    assert not ghost_ready(wrapped)
    train(wrapped, ds, steps=5, batch_size=32, ghost_batch=4, lr=0.05, progress=False)
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)  # float32 rounding, 5 steps


def test_grouped_evaluation_batches_give_the_per_batch_outputs_and_leave_the_model_alone():
    # exact_batches with a topped-up last batch (50 = 6 x 8 + 2): one grouped pass == one call per batch
    torch.manual_seed(1)
    net = MLP(6, 3, hidden=5).double()
    net.train(False)
    x = torch.randn(50, 6, dtype=torch.float64) * 2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = exact_batches(50, 8, seed=3)
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    fast = outputs_of_batches(net, x, batches)
    assert len(calls) == 1  # one pass, not one call per batch (7)
    hook.remove()
    slow = outputs_of_batches(nn.Sequential(net, nn.Dropout(0.0)), x, batches)  # not ghost_ready: per batch
    torch.testing.assert_close(fast, slow.to(fast.dtype), atol=1e-6, rtol=1e-6)
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
