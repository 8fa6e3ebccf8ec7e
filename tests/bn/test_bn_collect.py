import numpy as np
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.data import ArrayDataset
from shiftbn.studies.models import SharedHeadNet, SmallCNN
from tests.helpers import assert_same_state, capture_bn_inputs, moments_of, reference_moments, state_of


def _net2d(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3))


def _batches(shape, sources=3, per_source=3, bs=8, offset=0.0, seed=0):
    """Single-source batches (x, y, s); source k is shifted by k in mean and scale."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(sources):
        for _ in range(per_source):
            x = (torch.randn((bs, *shape), generator=g) * (1 + k) + 2.0 * k + offset).float()
            out.append((x, torch.zeros(bs, dtype=torch.long), torch.full((bs,), k)))
    return out


def _collect_checked(model, batches, rtol=1e-9, torch_rtol=1e-5, **kwargs):
    """collect_stats, checked three ways:
    1. against a numpy float64 two-pass over the very inputs each BN layer received (exactness);
    2. the first BN layer, whose input no BN influences, against an independent forward;
    3. every layer against torch's own train-mode BN forward, to ``torch_rtol`` (same batch-mode
       semantics; torch's float32 BN itself drifts by ~1e-4 when inputs carry an offset of 1e4).
    """
    with capture_bn_inputs(model) as seen:
        stats = sb.collect_stats(model, batches, progress=False, **kwargs)
    sources = [str(int(b[2][0])) for b in batches]
    first = next(iter(seen))
    for src in dict.fromkeys(sources):
        torch_ref = reference_moments(model, [b[0] for b, s in zip(batches, sources, strict=True) if s == src])
        for name, parts in seen.items():
            calls = len(parts) // len(batches)
            mine = [p for i, p in enumerate(parts) if sources[i // calls] == src]
            count, mean, var = moments_of(mine)
            got = stats[src][name]
            assert got.count == count
            np.testing.assert_allclose(got.mean, mean, rtol=rtol, atol=1e-12 * np.abs(mean).max())
            np.testing.assert_allclose(got.var, var, rtol=rtol)
            np.testing.assert_allclose(got.var, torch_ref[name][2], rtol=torch_rtol if name != first else rtol)
    pooled = stats.pooled()
    for name, parts in seen.items():
        count, mean, var = moments_of(parts)
        assert pooled[name].count == count
        np.testing.assert_allclose(pooled[name].var, var, rtol=rtol)
        np.testing.assert_allclose(pooled[name].mean, mean, rtol=rtol, atol=1e-12 * np.abs(mean).max())
    return stats


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_per_source_and_pooled_match_float64_reference(offset):
    model = _net2d()
    batches = _batches((2, 7, 7), offset=offset)
    before = state_of(model)
    stats = _collect_checked(model, batches, torch_rtol=1e-5 if offset == 0 else 1e-3)
    assert list(stats) == ["0", "1", "2"]
    assert_same_state(model, before)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3)), (5,)),
    (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1), nn.BatchNorm1d(2)),
     (2, 9)),
    (lambda: nn.Sequential(nn.Conv3d(1, 3, 2), nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 2, 1), nn.BatchNorm3d(2)),
     (1, 4, 4, 4)),
])
def test_bn1d_bn3d_shapes(make, shape):
    torch.manual_seed(0)
    model = make()
    _collect_checked(model, _batches(shape, offset=1e4), torch_rtol=1e-3)


def test_reused_module_keeps_call_sites_and_merged():
    model = SharedHeadNet(in_channels=1, width=4)
    batches = _batches((1, 8, 8), sources=2)
    stats = _collect_checked(model, batches)
    s0 = stats["0"]
    assert {"head_bn@0", "head_bn@1", "head_bn", "stem.1"} <= set(s0)
    assert s0["head_bn@0"].count == 3 * 8 * 64 and s0["head_bn@1"].count == 3 * 8 * 16
    merged = s0["head_bn@0"].merge(s0["head_bn@1"])
    np.testing.assert_allclose(s0["head_bn"].var, merged.var, rtol=1e-12)


def test_tagged_dataset_one_pass_single_source_batches_and_cap():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2, 5, 5)).astype(np.float32)
    src = np.repeat(["a", "b", "c"], [40, 30, 20])
    x[src == "b"] += 3.0
    ds = sb.SourceTaggedDataset(ArrayDataset(x, np.zeros(90)), src)
    model = _net2d()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    stats = sb.collect_stats(model, ds, batch_size=16, progress=False)
    assert sum(calls) == 90  # one pass over the data in total
    assert min(calls) >= 2
    assert stats["b"].num_samples == 30 and stats["b"]["1"].count == 30 * 9
    # the first BN layer's input does not depend on batching: compare with a direct reference
    ref = reference_moments(model, [torch.from_numpy(x[src == "b"])])
    np.testing.assert_allclose(stats["b"]["1"].var, ref["1"][2], rtol=1e-9)
    capped = sb.collect_stats(model, ds, num_samples=10, seed=1, progress=False)
    assert [capped[s].num_samples for s in capped] == [10, 10, 10]
    assert capped["a"]["1"].count == 10 * 9
    pooled_only = sb.collect_stats(model, ds, by_source=False, progress=False)
    assert list(pooled_only) == ["pooled"] and pooled_only["pooled"].num_samples == 90


def test_eval_mode_records_with_stored_statistics():
    model = _net2d()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    batches = _batches((2, 6, 6), sources=1)
    stats = sb.collect_stats(model, batches, mode="eval", progress=False)
    ref = reference_moments(model, [b[0] for b in batches], bn_train=False)
    np.testing.assert_allclose(stats["0"]["4"].var, ref["4"][2], rtol=1e-9)
    batch_mode = sb.collect_stats(model, batches, mode="batch", progress=False)
    assert not np.allclose(batch_mode["0"]["4"].var, stats["0"]["4"].var)


def test_sequential_is_the_inference_consistent_fixpoint():
    model = SmallCNN(in_channels=2, width=4)
    batches = _batches((2, 8, 8), sources=2)
    stats = sb.collect_stats(model, batches, mode="sequential", progress=False)
    assert stats.mode == "sequential" and 2 <= stats.passes <= 4 + 1
    for k in ("0", "1"):
        with sb.use_stats(model, stats[k]):
            ref = reference_moments(model, [b[0] for b in batches if int(b[2][0]) == int(k)], bn_train=False)
        for name, (_, mean, var) in ref.items():
            np.testing.assert_allclose(stats[k][name].var, var, rtol=1e-5)
            np.testing.assert_allclose(stats[k][name].mean, mean, rtol=1e-5, atol=1e-6)
    # batch-mode statistics of deeper layers are not consistent with inference
    batch_mode = sb.collect_stats(model, batches, mode="batch", progress=False)
    deep = "features.8"
    assert not np.allclose(batch_mode["0"][deep].var, stats["0"][deep].var, rtol=1e-3)


def test_nan_names_layer_and_source_and_model_is_restored():
    model = _net2d()
    batches = _batches((2, 6, 6))
    batches[4][0][0, 0, 0, 0] = float("nan")
    before = state_of(model)
    with pytest.raises(FloatingPointError, match=r"layer '1'.*source '1'"):
        sb.collect_stats(model, batches, progress=False)
    assert_same_state(model, before)


def test_bad_input_errors():
    model = _net2d()
    with pytest.raises(ValueError, match=r"one sample.*layer '0' one value per channel"):
        sb.collect_stats(nn.Sequential(nn.BatchNorm1d(3)), [torch.randn(1, 3)], progress=False)
    mixed = [(torch.randn(4, 2, 6, 6), torch.zeros(4), torch.tensor([0, 0, 1, 1]))]
    with pytest.raises(ValueError, match="single-source batches"):
        sb.collect_stats(model, mixed, progress=False)
    assert "pooled" in sb.collect_stats(model, mixed, by_source=False, progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        sb.collect_stats(model, mixed, mode="ema")
    with pytest.raises(TypeError, match="one-shot iterator"):
        sb.collect_stats(model, iter(mixed))
    with pytest.raises(ValueError, match="no BatchNorm"):
        sb.collect_stats(nn.Linear(2, 2), mixed)
    with pytest.raises(ValueError, match="data is empty"):
        sb.collect_stats(model, [], progress=False)


def test_model_in_train_mode_with_momentum_none_is_restored():
    model = _net2d()
    model.train()
    model[1].momentum = None
    model[4].eval()
    before = state_of(model)
    sb.collect_stats(model, _batches((2, 6, 6)), mode="sequential", progress=False)
    assert_same_state(model, before)


def test_sequential_passes_are_truncated_to_about_half_the_layers():
    torch.manual_seed(0)
    depth = 8
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    executed = []
    hooks = [m.register_forward_hook(lambda *a: executed.append(1)) for m in model if isinstance(m, nn.BatchNorm1d)]
    batches = [torch.randn(16, 6) * 3 + 2 for _ in range(4)]
    stats = sb.collect_stats(model, batches, by_source=False, mode="sequential", progress=False)["pooled"]
    for h in hooks:
        h.remove()
    forward_equivalents = len(executed) / (depth * len(batches))
    assert forward_equivalents <= (depth + 3) / 2
    # the fixpoint: with its statistics stored, every layer's input has exactly those statistics
    with sb.use_stats(model, stats):
        again = sb.collect_stats(model, batches, by_source=False, mode="eval", progress=False)["pooled"]
    for name, m in stats.layers.items():
        np.testing.assert_allclose(again[name].mean, m.mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(again[name].var, m.var, rtol=1e-6, atol=1e-9)
