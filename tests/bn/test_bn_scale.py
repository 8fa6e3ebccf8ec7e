"""Real scale: bounded memory, any BN flavour and dtype, the fused reduction, device checks."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shiftbn as sb
from shiftbn.bn import native
from shiftbn.bn.reduce import RunningMoments, fused_sums
from shiftbn.studies.models import SmallCNN3d
from tests.helpers import assert_same_state, capture_bn_inputs, moments_of, reference_moments, state_of

ROOT = Path(__file__).resolve().parents[2]


def _collect_checked(model, batches, **kwargs):
    """collect_stats, checked against numpy float64 moments of exactly the tensors each BN received
    (1e-9 relative), and loosely against torch's own train-mode BN."""
    with capture_bn_inputs(model) as seen:
        stats = sb.collect_stats(model, batches, by_source=False, progress=False, **kwargs)["pooled"]
    for name, parts in seen.items():
        count, mean, var = moments_of(parts)
        got = stats.layers[name]
        assert got.count == count
        np.testing.assert_allclose(got.mean, mean, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(mean).max()))
        np.testing.assert_allclose(got.var, var, rtol=1e-9, atol=1e-12)
    return stats


def test_batchnorm3d_model_matches_float64_reference():
    model = SmallCNN3d(1, 3, width=4).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 1, 4, 8, 8, generator=g) * 2 + 5 for _ in range(3)]
    before = state_of(model)
    stats = _collect_checked(model, batches)
    assert_same_state(model, before)
    for name, (_, _, var) in reference_moments(model, batches).items():  # torch's own BN: float32
        np.testing.assert_allclose(stats[name].var, var, rtol=1e-4, atol=1e-6)


def test_sync_batchnorm_on_cpu_is_collected_like_batchnorm():
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(plain)  # shares parameters' values, SyncBatchNorm modules
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    batches = [torch.randn(4, 2, 8, 8) + 3 for _ in range(3)]
    a = sb.collect_stats(plain.eval(), batches, by_source=False, progress=False)["pooled"]
    b = sb.collect_stats(synced.eval(), batches, by_source=False, progress=False)["pooled"]
    for name in a.layers:
        np.testing.assert_array_equal(a[name].mean, b[name].mean)
        np.testing.assert_array_equal(a[name].var, b[name].var)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_input_dtype_is_accumulated_exactly_in_float64(dtype):
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g) * 3 + 2).to(dtype) for _ in range(4)]
    _collect_checked(model, batches)


def test_amp_statistics_come_from_the_tensor_bn_receives():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).eval()
    batches = [torch.randn(8, 5) + 1 for _ in range(3)]
    seen = []
    hook = model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    _collect_checked(model, batches, amp=True)
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)  # autocast on CPU: bfloat16 linear outputs


def test_a_device_other_than_the_models_is_refused_and_the_model_untouched():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"model is on cpu but device='meta'.*model\.to"):
        sb.collect_stats(model, [torch.randn(4, 3)], by_source=False, device="meta", progress=False)
    with pytest.raises(ValueError, match="not a torch device"):
        sb.collect_stats(model, [torch.randn(4, 3)], by_source=False, device="gpu0", progress=False)
    assert_same_state(model, before)
    assert sb.collect_stats(model, [torch.randn(4, 3)], by_source=False, device="cpu", progress=False)


def test_running_moments_keep_o_channels_state_and_equal_one_big_batch():
    acc = RunningMoments()
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(5, 7, 3, generator=g) * 0.1 + 1e4 for _ in range(50)]
    for p in parts:
        acc.add(p)
    assert set(acc.__slots__) == {"count", "mean", "m2", "n_native", "shift", "s1", "s2"} and acc.mean.shape == (7,)
    allx = torch.cat(parts).double().transpose(0, 1).reshape(7, -1).numpy()
    got = acc.result()
    np.testing.assert_allclose(got.mean, allx.mean(1), rtol=1e-12)
    np.testing.assert_allclose(got.var, allx.var(1), rtol=1e-9)
    if not native.available():
        return
    # the C kernel's fixed-shift totals, alone and mixed with the merged batches: still O(channels) state
    bn = torch.nn.BatchNorm1d(7)
    mixed, alone = RunningMoments(), RunningMoments()
    for i, p in enumerate(parts):
        y = alone.add_native(p, bn)
        ref = F.batch_norm(p, p.double().mean((0, 2)).float(), p.double().var((0, 2), unbiased=False).float(),
                           bn.weight, bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)  # bit-identical where torch's build uses FMA
        mixed.add_native(p, bn) if i % 3 else mixed.add(p)
    assert alone.s1.shape == (7,) and alone.count == 0 and alone.n_native == 50 * 5 * 3
    for acc in (alone, mixed):
        got = acc.result()
        assert got.count == 750
        np.testing.assert_allclose(got.mean, allx.mean(1), rtol=1e-12)
        np.testing.assert_allclose(got.var, allx.var(1), rtol=1e-9)


def test_fused_reduction_is_exact_at_a_large_offset():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, 6, 6, generator=g) * 0.5 + 1e4
    shift = x.double().mean((0, 2, 3))
    sums = fused_sums(x, shift)
    if sums is None:
        pytest.skip("torch.compile cannot build kernels here (no C++ compiler)")
    ref = x.double().transpose(0, 1).reshape(4, -1) - shift.view(-1, 1)
    torch.testing.assert_close(sums[0], ref.sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(sums[1], (ref * ref).sum(1), rtol=1e-12, atol=1e-9)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(6, 4, 5, 5, generator=g) * 0.1 + 1e4 for _ in range(5)]
    eager = sb.collect_stats(model, batches, by_source=False, fused=False, progress=False)["pooled"]
    fused = sb.collect_stats(model, batches, by_source=False, fused=True, progress=False)["pooled"]
    for name in eager.layers:
        np.testing.assert_allclose(fused[name].mean, eager[name].mean, rtol=1e-12)
        np.testing.assert_allclose(fused[name].var, eager[name].var, rtol=1e-9)


def test_memory_does_not_grow_with_the_number_of_batches():
    script = textwrap.dedent("""
        import resource, torch, shiftbn as sb
        torch.set_num_threads(1)
        model = torch.nn.Sequential(torch.nn.BatchNorm1d(2048), torch.nn.BatchNorm1d(2048)).eval()

        class Batches:
            def __init__(self, n):
                self.n = n
            def __len__(self):
                return self.n
            def __iter__(self):
                g = torch.Generator().manual_seed(0)
                for _ in range(self.n):
                    yield torch.randn(4, 2048, generator=g)

        peaks = []
        for n in (100, 1500):
            sb.collect_stats(model, Batches(n), by_source=False, progress=False)
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        print(peaks[0], peaks[1])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    small, large = (int(v) for v in out.stdout.split())
    # per-batch records would hold 1,400 more batches x 2 layers x 2 x 2048 float64 = 92 MB
    assert large - small < 20_000, (small, large)  # KiB
