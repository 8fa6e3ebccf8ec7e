"""Prediction-time BN (``batch_statistics``): the moments path against PyTorch's training-mode kernel and
a float64 reference, which layers take which path, and the model left exactly as it was."""

import copy

import pytest
import torch
from torch import nn

from shiftbn.bn.batchstats import _measurable, batch_statistics, batch_stats_logits
from tests.helpers import assert_same_state, state_of


class _Mixed(nn.Module):
    """BN1d/2d/3d, a BN module called twice per forward, and one BN layer without running statistics."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv3d(2, 3, 1)
        self.bn3 = nn.BatchNorm3d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.BatchNorm2d(4)
        self.untracked = nn.BatchNorm2d(4, track_running_stats=False)
        self.head = nn.Linear(4, 5)
        self.bn1 = nn.BatchNorm1d(5)

    def forward(self, x):
        h = torch.relu(self.bn3(self.conv3(x))).mean(2)
        h = self.shared(self.conv2(h))
        h = self.untracked(self.shared(h))  # the shared module's second call sees another input
        return self.bn1(self.head(h.mean((2, 3))))


def _trained():
    torch.manual_seed(0)
    model = _Mixed()
    model.train()
    for _ in range(3):  # running statistics and affine parameters away from their defaults
        model(torch.randn(6, 2, 3, 5, 5) * 2 + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _training_kernel(model):
    """The reference: every BN module in training mode without running statistics."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
    return ref


def test_moments_path_equals_the_training_kernel_and_a_float64_reference():
    model = _trained()
    x = torch.randn(7, 2, 3, 5, 5) * 3 + 2
    with torch.no_grad():
        want = _training_kernel(model)(x)
        exact = _training_kernel(model).double()(x.double())
    before = state_of(model)
    with torch.no_grad(), batch_statistics(model):
        got = model(x)
    assert_same_state(model, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    # and the answer depends on the batch: another batch's statistics give other outputs for the same samples
    with torch.no_grad(), batch_statistics(model):
        assert not torch.allclose(model(torch.cat([x[:3], x[:3] * 5]))[:3], got[:3], atol=1e-3)


def test_tracked_float32_layers_run_the_eval_kernel_and_the_others_the_training_kernel():
    model = _trained()
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = module.training
        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad(), batch_statistics(model):
            assert not model.training
            model(torch.randn(4, 2, 3, 5, 5))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"bn3": False, "shared": False, "untracked": True, "bn1": False}
    # half-precision buffers would round the batch's moments, lazy ones hold none yet: PyTorch's kernel serves them
    assert _measurable(nn.BatchNorm1d(3)) and _measurable(nn.BatchNorm1d(3).double())
    assert not _measurable(nn.BatchNorm1d(3).half()) and not _measurable(nn.LazyBatchNorm1d())
    assert not _measurable(nn.BatchNorm1d(3, track_running_stats=False))


def test_model_is_restored_after_an_error_and_one_value_per_channel_is_refused():
    model = _trained()
    model.train()
    before = state_of(model)
    with pytest.raises(ValueError, match=r"a batch of 1 sample\(s\) gives a BN layer one value per channel"):
        batch_stats_logits(model, torch.randn(3, 2, 3, 5, 5), batch_size=2, seed=0)  # batches of 2 and 1
    assert_same_state(model, before)
    assert model.training and all(m.training for m in model.modules())

    def boom(module, args):
        raise KeyboardInterrupt

    handle = model.head.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), batch_statistics(model):
        model(torch.randn(4, 2, 3, 5, 5))
    handle.remove()
    assert_same_state(model, before)


def test_a_model_without_bn_runs_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9)).train()
    x = torch.randn(5, 3)
    with torch.no_grad(), batch_statistics(model):
        out = model(x)
    torch.testing.assert_close(out, model[0](x))
    assert model.training


class _Shifted(nn.BatchNorm2d):
    """A BN class with its own forward that changes the input before it normalizes (as timm's or a ghost BN)."""

    def forward(self, x):
        return super().forward(x * 2 + 3)


class _Keyword(nn.Module):
    """Calls its BN by keyword and routes an empty selection through a second one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.shifted = _Shifted(4)
        self.bn = nn.BatchNorm2d(4)
        self.empty = nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.bn(input=self.shifted(self.conv(x)))
        pooled = h.mean((2, 3))
        none = self.empty(pooled[pooled[:, 0] > 1e9])  # no sample selected
        return pooled + none.sum()


def _reference_outputs(model, x):
    with torch.no_grad():
        return _training_kernel(model)(x)


def test_own_forward_classes_keyword_calls_and_empty_inputs_match_the_training_kernel():
    torch.manual_seed(0)
    model = _Keyword().eval()
    model.bn.forward = model.bn.forward  # a forward set on the instance: PyTorch's kernel too
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(6, 2, 7, 7)
    before = state_of(model)
    with torch.no_grad(), batch_statistics(model):
        got = model(x)
    assert_same_state(model, before)
    torch.testing.assert_close(got, _reference_outputs(model, x), rtol=1e-5, atol=1e-5)
    assert not _measurable(model.shifted) and not _measurable(model.bn) and _measurable(model.empty)
    del model.bn.forward
    with torch.no_grad(), batch_statistics(model):  # the keyword call now goes through the hook
        torch.testing.assert_close(model(x), _reference_outputs(model, x), rtol=1e-5, atol=1e-5)


def test_layers_the_eval_kernel_cannot_take_keep_pytorchs_kernel_and_gradients_too():
    mixed = nn.BatchNorm1d(3)
    mixed.weight.data = mixed.weight.data.bfloat16()
    assert not _measurable(mixed)
    with torch.inference_mode():
        built = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert not _measurable(built[1])
    x = torch.randn(5, 3)
    before = state_of(built)
    out = batch_stats_logits(built, x, batch_size=5, seed=0)
    assert_same_state(built, before)
    torch.testing.assert_close(out, _reference_outputs(built, x), rtol=1e-5, atol=1e-5)  # one batch of all 5
    model = _trained()
    seen = set()
    hook = model.bn3.register_forward_pre_hook(lambda m, a: seen.add(m.training))
    with batch_statistics(model):
        model(torch.randn(4, 2, 3, 5, 5)).sum().backward()  # gradients: the training kernel differentiates
    hook.remove()
    assert seen == {True} and model.conv3.weight.grad is not None


def test_wrong_input_rank_gets_pytorchs_message():
    model = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        batch_stats_logits(model, torch.randn(8), batch_size=4, seed=0)
