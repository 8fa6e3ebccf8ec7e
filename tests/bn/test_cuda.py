"""BN statistics on CUDA: float32/float16/bfloat16 inputs, the compiled reduction, ``amp`` and ``device=``,
each against the float64 reduction of the same values on the CPU. Skipped without CUDA
(``benchmarks/gpu.sh`` runs them on a CUDA machine)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import shiftbn as sb
from tests.helpers import assert_same_state, state_of

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu.sh runs these)")


def _float64_moments(parts: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance of the concatenated (N, C, *) parts, numpy float64."""
    rows = np.concatenate([p.detach().cpu().double().numpy().swapaxes(0, 1).reshape(p.shape[1], -1) for p in parts], 1)
    return rows.mean(1), rows.var(1)


@contextlib.contextmanager
def _exact_matmuls():
    """TF32 off: convolutions and matmuls in true float32 on both devices (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_statistics_on_cuda_equal_the_float64_reduction_per_source(dtype, fused):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(5)).to(DEVICE, dtype).eval()
    before = state_of(model)
    # values exactly representable in every dtype tried, offset so a float32 sum would lose digits
    batches = [((torch.randint(-64, 64, (6, 5, 7, 9), generator=g).float() / 8 + 100 * (1 + k % 2)).to(DEVICE, dtype),
                torch.zeros(6), torch.full((6,), k % 2)) for k in range(6)]
    stats = sb.collect_stats(model, batches, options=sb.CollectOptions(fused=fused), progress=False)
    assert_same_state(model, before)
    for src in (0, 1):
        mean, var = _float64_moments([b[0] for b in batches if int(b[2][0]) == src])
        got = stats[src]["0"]
        assert got.mean.dtype == np.float64
        np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(got.var, var, rtol=1e-12)


def test_amp_on_cuda_measures_the_float16_inputs_bn_receives():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)).to(DEVICE).eval()
    xs = [(torch.randn(32, 8, generator=g) * 3 + 7).to(DEVICE) for _ in range(4)]
    half = torch.float16 if torch.device(DEVICE).type == "cuda" else torch.bfloat16  # what amp=True uses there
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=half):
        hs = [model[0](x) for x in xs]
    assert hs[0].dtype == half
    mean, var = _float64_moments(hs)
    got = sb.collect_stats(model, xs, by_source=False, amp=True, progress=False)["pooled"]["1"]
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got.var, var, rtol=1e-12)


def test_a_cuda_model_with_cpu_data_matches_the_cpu_run_and_is_restored():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 3, 10, 10, generator=g) * 2 + 50
    ds = sb.SourceTaggedDataset(TensorDataset(x, torch.zeros(48)), ["a", "b", "c"] * 16)
    cpu_model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model.load_state_dict(cpu_model.state_dict())
    model.to(DEVICE)
    before = state_of(model)
    with _exact_matmuls():
        ours = sb.collect_stats(model, ds, batch_size=8, options=sb.CollectOptions(device=DEVICE), progress=False)
        ref = sb.collect_stats(cpu_model, ds, batch_size=8, options=sb.CollectOptions(fused=False), progress=False)
    assert_same_state(model, before)
    for src in ("a", "b", "c"):
        np.testing.assert_allclose(ours[src]["0"].var, ref[src]["0"].var, rtol=1e-12)  # the inputs themselves
        np.testing.assert_allclose(ours[src]["2"].mean, ref[src]["2"].mean, rtol=1e-5, atol=1e-6)  # float32 conv
        np.testing.assert_allclose(ours[src]["2"].var, ref[src]["2"].var, rtol=1e-5)
    with pytest.raises(ValueError, match="the model is on"):
        sb.collect_stats(cpu_model, ds, options=sb.CollectOptions(device=DEVICE), progress=False)


def test_precise_bn_on_cuda_writes_the_float64_population_statistics():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.BatchNorm2d(4)).to(DEVICE).eval()
    xs = [(torch.randn(16, 4, 6, 6, generator=g) + 20).to(DEVICE) for _ in range(5)]
    sb.precise_bn(model, xs, num_samples=None, progress=False)
    mean, var = _float64_moments(xs)
    bn = model[0]
    torch.testing.assert_close(bn.running_mean.cpu(), torch.as_tensor(mean).float(), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var.cpu(), torch.as_tensor(var).float(), rtol=0, atol=0)
