"""The C kernel for batch-mode BN on CPU (``bn.native``): exact sums, torch's BN output, fallbacks, restore."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shiftbn as sb
from shiftbn.bn import native
from shiftbn.bn.reduce import RunningMoments
from shiftbn.studies.models import SmallCNN3d, SmallResNet
from tests.helpers import assert_same_state, reference_moments, state_of

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler here: the torch paths are tested")


def _no_instance_forward(model: nn.Module) -> bool:
    return not any("forward" in vars(m) for m in model.modules())


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 37), (6, 5, 7), (4, 3, 24, 24), (3, 4, 5, 8), (2, 3, 4, 5, 6), (5, 2, 40)])
@pytest.mark.parametrize("affine", [True, False])
def test_kernel_sums_are_float64_exact_and_output_is_torchs_bn(shape, affine):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 0.5 + 1e4  # offset 1e4: float32 sums would lose 4 digits
    c = shape[1]
    w = torch.rand(c, generator=g) + 0.5 if affine else None
    b = torch.randn(c, generator=g) if affine else None
    shift = torch.full((c,), 1e4 - 0.3, dtype=torch.float64)
    t1, t2 = torch.ones(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)  # sums are *added*
    y = native.batch_norm_sums(x, shift, t1, t2, w, b, 1e-5)
    rows = x.double().numpy().swapaxes(0, 1).reshape(c, -1) - (1e4 - 0.3)
    np.testing.assert_allclose(t1.numpy() - 1, rows.sum(1), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(t2.numpy() - 1, (rows ** 2).sum(1), rtol=1e-12)
    n = rows.shape[1]
    mean, var = 1e4 - 0.3 + rows.sum(1) / n, rows.var(1)
    ref = F.batch_norm(x, torch.as_tensor(mean).float(), torch.as_tensor(var).float(), w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=2e-6)  # bit-identical where torch's build uses FMA


@needs_kernel
def test_kernel_refuses_what_it_cannot_take_instead_of_reading_wild_memory():
    x = torch.randn(4, 3, 5)
    k, t = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for bad in (x.double(), x.half(), x.transpose(1, 2).contiguous().transpose(1, 2), x[:0], torch.randn(5)):
        assert not native.accepts(bad, None, None)
        with pytest.raises(ValueError, match="does not take this input"):
            native.batch_norm_sums(bad, k, t, t)
    assert not native.accepts(x, torch.ones(4), None)  # weight of another channel count
    assert not native.accepts(x, torch.ones(3, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="float64 contiguous CPU tensors of 3 channels"):
        native.batch_norm_sums(x, k.float(), t, t)
    with pytest.raises(ValueError, match="float64 contiguous CPU tensors of 3 channels"):
        native.batch_norm_sums(x, k, torch.zeros(4, dtype=torch.float64), t)


@needs_kernel
@pytest.mark.parametrize("make", [lambda: SmallResNet(in_channels=3, width=8),
                                  lambda: nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                                        nn.Linear(16, 8), nn.BatchNorm1d(8, affine=False))])
def test_collect_stats_through_the_kernel_equals_the_eager_float64_path(make):
    model = make().eval()
    shape = (12, 3, 16, 16) if isinstance(model, SmallResNet) else (12, 6)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=g) * (1 + k % 3) + 50, torch.zeros(12), torch.full((12,), k % 3))
               for k in range(7)]
    before = state_of(model)
    ours = sb.collect_stats(model, batches, mode="batch", progress=False)
    assert_same_state(model, before)
    assert _no_instance_forward(model)
    eager = sb.collect_stats(model, batches, mode="batch", fused=False, progress=False)
    assert list(ours.sources) == list(eager.sources) == ["0", "1", "2"]
    for src in ours.sources:
        for name, m in ours[src].layers.items():
            r = eager[src][name]
            assert m.count == r.count
            np.testing.assert_allclose(m.mean, r.mean, rtol=1e-12, atol=1e-12 * np.sqrt(r.var.max()))
            np.testing.assert_allclose(m.var, r.var, rtol=1e-11)
    # and torch's own train-mode BN, seen from outside (float32 statistics): same inputs to 1e-4
    xs = [x for x, _, s in batches if s[0] == 0]
    for name, (_, _, var) in reference_moments(model, xs).items():
        np.testing.assert_allclose(ours["0"][name].var, var, rtol=1e-4, atol=1e-7)


@needs_kernel
def test_an_outlying_first_sample_does_not_cost_the_1e9_bar():
    # the shift starts at the first sample's mean; here that sample sits 1,000 standard deviations away
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 4, 6, 6, generator=g) + 1e4 for _ in range(10)]
    xs[0][0] += 1e3
    model = nn.Sequential(nn.BatchNorm2d(4)).eval()
    got = sb.collect_stats(model, xs, by_source=False, progress=False)["pooled"]["0"]
    ref = np.concatenate([x.double().numpy() for x in xs]).swapaxes(0, 1).reshape(4, -1)
    np.testing.assert_allclose(got.mean, ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(got.var, ref.var(1), rtol=1e-9)


@needs_kernel
def test_inputs_the_kernel_does_not_take_go_the_torch_way_with_the_same_statistics():
    model = SmallResNet(in_channels=3, width=8).eval()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 3, 12, 12, generator=g) + 2 for _ in range(3)]
    plain = sb.collect_stats(model, xs, by_source=False, progress=False)["pooled"]
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # BN inputs channels_last: not contiguous
    before = state_of(cl)
    got = sb.collect_stats(cl, [x.to(memory_format=torch.channels_last) for x in xs], by_source=False,
                           progress=False)["pooled"]
    assert_same_state(cl, before)
    assert _no_instance_forward(cl)
    for name in plain.layers:
        np.testing.assert_allclose(got[name].var, plain[name].var, rtol=1e-5)
    wide = copy.deepcopy(model).double()  # float64 inputs: the eager float64 reduction
    got = sb.collect_stats(wide, [x.double() for x in xs], by_source=False, progress=False)["pooled"]
    for name in plain.layers:
        np.testing.assert_allclose(got[name].var, plain[name].var, rtol=1e-4)


class _Scaled(nn.BatchNorm2d):
    """A user's BN subclass with its own forward: must keep it (the kernel serves plain BN only)."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x) * 2


def test_a_bn_subclass_with_its_own_forward_keeps_it():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), _Scaled(3), nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)).eval()
    xs = [torch.randn(4, 1, 9, 9) for _ in range(2)]
    _Scaled.calls = 0
    ours = sb.collect_stats(model, xs, by_source=False, progress=False)["pooled"]
    assert _Scaled.calls == 2
    ref = reference_moments(model, xs)
    for name, (_, _, var) in ref.items():
        np.testing.assert_allclose(ours[name].var, var, rtol=1e-4)


class _Boom(nn.Module):
    def __init__(self, exc: type[BaseException]) -> None:
        super().__init__()
        self.exc, self.calls = exc, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise self.exc("stop")
        return x


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_the_module_forward_is_restored_on_errors_and_interrupts(exc):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), _Boom(exc), nn.Conv2d(3, 2, 3),
                          nn.BatchNorm2d(2)).eval()
    before = state_of(model)
    with pytest.raises(exc, match="stop"):
        sb.collect_stats(model, [torch.randn(4, 1, 8, 8) for _ in range(3)], by_source=False, progress=False)
    assert_same_state(model, before)
    assert _no_instance_forward(model)
    assert type(model[1]).forward is nn.BatchNorm2d.forward


def test_no_compiler_means_a_warning_and_the_torch_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SHIFTBN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="kernel is unavailable.*same results, slower"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()  # once
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval()
    xs = [torch.randn(4, 1, 8, 8) + 3 for _ in range(2)]
    got = sb.collect_stats(model, xs, by_source=False, progress=False)["pooled"]["1"]
    _, _, var = reference_moments(model, xs)["1"]
    np.testing.assert_allclose(got.var, var, rtol=1e-4)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTBN_NATIVE", "0")
    monkeypatch.delenv("CC")
    assert not native.available()


@needs_kernel
def test_the_kernel_is_built_once_per_machine_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTBN_CACHE_DIR", str(tmp_path))
    assert native.available()
    built = sorted((tmp_path / "kernels").iterdir(), key=lambda p: p.suffix)
    assert [p.suffix for p in built] == [".json", ".lock", ".so"]  # library, its digest, build lock; no temporary
    stamp = built[2].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.available()
    assert built[2].stat().st_mtime_ns == stamp


@needs_kernel
def test_running_moments_mix_kernel_and_torch_batches_exactly():
    bn = nn.BatchNorm2d(3)
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(4, 3, 5, 5, generator=g) * 0.1 + 1e4 for _ in range(9)]
    acc = RunningMoments()
    for i, p in enumerate(parts):
        if i % 2:
            acc.add(p)
        else:
            acc.add_native(p, bn)
    ref = np.concatenate([p.double().numpy() for p in parts]).swapaxes(0, 1).reshape(3, -1)
    got = acc.result()
    assert got.count == ref.shape[1] and acc.finite()
    np.testing.assert_allclose(got.mean, ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(got.var, ref.var(1), rtol=1e-9)
    bad = parts[0].clone()
    bad[1, 2, 3, 3] = float("nan")
    acc.add_native(bad, bn)
    assert not acc.finite()


@needs_kernel
def test_batchnorm3d_through_the_kernel_matches_torch():
    model = SmallCNN3d(1, 3, width=4).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 1, 4, 8, 8, generator=g) * 2 + 5 for _ in range(3)]
    ours = sb.collect_stats(model, batches, by_source=False, progress=False)["pooled"]
    eager = sb.collect_stats(model, batches, by_source=False, fused=False, progress=False)["pooled"]
    for name in ours.layers:
        np.testing.assert_allclose(ours[name].var, eager[name].var, rtol=1e-11)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 9), (2, 2, 39, 41, 43)])  # in cache / second sweep; L % 16 != 0
def test_5d_kernel_sums_are_float64_exact_and_output_is_torchs_bn(shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g) * 3 + 1e3
    c = shape[1]
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    shift = torch.full((c,), 1e3 + 0.7, dtype=torch.float64)
    t1, t2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    y = native.batch_norm_sums(x, shift, t1, t2, w, b, 1e-5)
    rows = x.double().numpy().swapaxes(0, 1).reshape(c, -1) - (1e3 + 0.7)
    np.testing.assert_allclose(t1.numpy(), rows.sum(1), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(t2.numpy(), (rows ** 2).sum(1), rtol=1e-12)
    mean, var = 1e3 + 0.7 + rows.mean(1), rows.var(1)
    ref = F.batch_norm(x, torch.as_tensor(mean).float(), torch.as_tensor(var).float(), w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=2e-6)


@needs_kernel
def test_unet3d_statistics_through_the_kernel_equal_the_eager_float64_reduction():
    from shiftbn.studies.models import unet3d

    model = unet3d(width=2).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 1, 8, 8, 12, generator=g) * 4 + 100 for _ in range(3)]
    calls = []
    real = native.batch_norm_sums
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "batch_norm_sums", lambda x, *a, **k: calls.append(x.dim()) or real(x, *a, **k))
        ours = sb.collect_stats(model, batches, by_source=False, progress=False)["pooled"]
    assert calls == [5] * 30  # every BatchNorm3d of every batch went through the kernel
    eager = sb.collect_stats(model, batches, by_source=False, options=sb.CollectOptions(fused=False),
                             progress=False)["pooled"]
    ref = reference_moments(model, batches)  # torch's own train-mode BN3d: the same normalization
    for name in ours.layers:
        np.testing.assert_allclose(ours[name].mean, eager[name].mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours[name].var, eager[name].var, rtol=1e-12)
        np.testing.assert_allclose(ours[name].var, ref[name][2], rtol=1e-5)  # float32 forward of torch's BN


@needs_kernel
def test_a_batch_far_from_the_first_one_is_normalized_with_its_own_exact_statistics():
    # the totals' shift is the first batch's mean (1e7 here); a later batch at 0 with std 1e-3 must not
    # have its variance cancel against that shift (its output and every later layer would be wrong)
    g = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm1d(6)
    acc = RunningMoments()
    first = torch.randn(32, 6, generator=g) + 1e7
    later = torch.randn(32, 6, generator=g) * 1e-3
    acc.add_native(first, bn)
    y = acc.add_native(later, bn)
    ref = F.batch_norm(later.double(), None, None, bn.weight.double(), bn.bias.double(), True, 0.0, bn.eps).float()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-5)
    both = np.concatenate([first.double().numpy(), later.double().numpy()])
    got = acc.result()
    np.testing.assert_allclose(got.mean, both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got.var, both.var(0), rtol=1e-9)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    xs = [torch.randn(16, 4, generator=g) + (1e6 if i == 0 else 0.0) for i in range(4)]
    ours = sb.collect_stats(model, xs, by_source=False, progress=False)["pooled"]["2"]
    eager = sb.collect_stats(model, xs, by_source=False, fused=False, progress=False)["pooled"]["2"]
    np.testing.assert_allclose(ours.var, eager.var, rtol=1e-9)


@needs_kernel
def test_inputs_torch_refuses_are_refused_on_the_kernel_path_too():
    for model, x, error in ((nn.Sequential(nn.BatchNorm2d(3)), torch.randn(4, 3, 5), "expected 4D input"),
                            (nn.Sequential(nn.BatchNorm1d(3)), torch.randn(4, 3, 2, 2), "expected 2D or 3D input"),
                            (nn.Sequential(nn.BatchNorm2d(4, affine=False)), torch.randn(4, 3, 5, 5), "")):
        before = state_of(model.eval())
        with pytest.raises((ValueError, RuntimeError), match=error):
            sb.collect_stats(model, [x], by_source=False, progress=False)
        assert_same_state(model, before)
        assert _no_instance_forward(model)


def test_a_kernel_out_of_memory_is_an_error_not_a_dropped_batch(monkeypatch):
    class _Lib:
        @staticmethod
        def shiftbn_bn_batch(*args):
            return 1

    monkeypatch.setattr(native, "_state", {"lib": _Lib()})
    k = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(MemoryError, match="could not allocate"):
        native.batch_norm_sums(torch.randn(4, 3, 5), k, k.clone(), k.clone())
