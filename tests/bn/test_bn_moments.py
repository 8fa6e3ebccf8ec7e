import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shiftbn.bn.moments import BNStats, Moments, SourceStats, Workspace, batch_moments


def _moments(x: np.ndarray) -> Moments:
    return Moments(len(x), x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).sum(axis=0))


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=3, max_size=3), offset=st.sampled_from([0.0, 1e4]),
       seed=st.integers(0, 100))
@example(sizes=[1, 18, 11], offset=0.0, seed=50)  # a mean near zero (relative error 1.5e-12, absolute 1e-17)
def test_merge_is_exact_and_associative(sizes, offset, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(offset, rng.uniform(0.1, 3), size=(n, 4)) for n in sizes]
    a, b, c = (_moments(p) for p in parts)
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    ref = _moments(np.concatenate(parts))
    assert left.count == ref.count == right.count
    # Any float64 merge loses ~eps * |mean| / std relative in the variance (the means' rounding
    # enters the between-part term), so the bounds scale with that condition number: 1e-12 and
    # 1e-9 for well-conditioned data; hypothesis finds 3 single points at 1e4 with std 0.1 (cond 1e5).
    cond = max(1.0, float(np.max(np.abs(ref.mean) / np.sqrt(ref.var + 1e-300))))
    # a mean near zero has no relative precision: its rounding is ~eps times the data's spread
    spread = 1e-13 * float(np.max(np.sqrt(ref.var)) + np.max(np.abs(ref.mean)))
    np.testing.assert_allclose(left.mean, right.mean, rtol=1e-12, atol=spread)
    np.testing.assert_allclose(left.var, right.var, rtol=1e-12 * cond, atol=1e-300)
    np.testing.assert_allclose(left.mean, ref.mean, rtol=1e-12, atol=spread)
    np.testing.assert_allclose(left.var, ref.var, rtol=1e-9 * cond)


def test_batch_moments_float32_with_large_offset_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 5, 5, generator=g) + 1e4).float()
    count, mean, m2 = batch_moments(x)
    xd = x.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    assert count == 64 * 25 and mean.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), xd.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2.numpy() / count, xd.var(0), rtol=1e-9)


def test_serialization_roundtrips_and_tidy_frame():
    rng = np.random.default_rng(0)
    bn = BNStats({"a": _moments(rng.normal(size=(10, 2))), "b": _moments(rng.normal(size=(7, 3)))}, 10)
    ss = SourceStats({"lab1": bn, "lab2": bn})
    back = SourceStats.from_dict(json.loads(json.dumps(ss.to_dict())))
    assert back["lab2"]["b"].count == 7
    np.testing.assert_array_equal(back["lab1"]["a"].var, bn["a"].var)
    df = ss.to_frame()
    assert list(df.columns) == ["source", "layer", "channel", "count", "mean", "var"]
    assert len(df) == 2 * (2 + 3)
    pooled = ss.pooled()
    assert pooled["a"].count == 20 and pooled.num_samples == 20
    np.testing.assert_allclose(pooled["a"].var, bn["a"].var, rtol=1e-12)
    with pytest.raises(KeyError, match="lab1"):
        ss["lab3"]


def test_batch_moments_any_memory_layout_with_and_without_workspace():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
    ref = x.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    ws = Workspace()
    for _ in range(2):
        for w in (None, ws):
            count, mean, m2 = batch_moments(x, w)
            np.testing.assert_allclose(mean.numpy(), ref.mean(0), rtol=1e-12)
            np.testing.assert_allclose(m2.numpy() / count, ref.var(0), rtol=1e-12)
    assert x.is_contiguous(memory_format=torch.channels_last)  # the input is left as it was


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("shape", [(64, 3, 5, 5), (40, 6), (7, 4, 9), (2, 3, 1, 1)])
def test_fast_batch_moments_match_float64_within_1e6(offset, shape):
    # fast_batch_moments (three float32 passes) against the float64 two-pass reference, any rank, contiguous or
    # channels-last, with and without a workspace reused across shapes; the input is left as it was
    from shiftbn.bn.moments import fast_batch_moments

    g = torch.Generator().manual_seed(2)
    x = 3.0 * torch.randn(*shape, generator=g) + offset
    ref = x.double().movedim(1, -1).reshape(-1, shape[1]).numpy()
    ws = Workspace()
    layouts = [x] + ([x.to(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for xi in layouts:
        before = xi.clone()
        for w in (None, ws, ws):
            count, mean, m2 = fast_batch_moments(xi, w)
            assert count == ref.shape[0] and mean.dtype == m2.dtype == torch.float64
            np.testing.assert_allclose(mean.numpy(), ref.mean(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(m2.numpy() / count, ref.var(0), rtol=1e-6, atol=1e-9)
        assert torch.equal(xi, before)
    for dtype in (torch.float64, torch.bfloat16):  # other dtypes: the exact float64 path
        xd = x.to(dtype)
        assert all(torch.equal(a, b) for a, b in zip(fast_batch_moments(xd)[1:], batch_moments(xd)[1:], strict=True))
