"""Inputs meeting the model: another dtype than the model's, complex inputs, a model on the meta device."""

import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn._torch import forward_batches
from shiftbn.bn import collect_stats, precise_bn
from shiftbn.bn.batchstats import batch_stats_logits
from tests.helpers import assert_same_state, state_of


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2)).eval()


X = torch.randn(8, 1, 2, 2)


@pytest.mark.parametrize("model_dtype, data_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float32),
                                                     (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_dtype_mismatch_is_named_with_the_fix(model_dtype, data_dtype):
    model = _net().to(model_dtype)
    before = state_of(model)
    x = X.to(data_dtype)
    want = rf"model's parameters are {model_dtype} but the inputs are {data_dtype}.*x\.to\({model_dtype}\)"
    calls = [lambda: collect_stats(model, [x], by_source=False, progress=False),
             lambda: collect_stats(model, [x], by_source=False, mode="sequential", progress=False),
             lambda: precise_bn(model, [x], progress=False),
             lambda: forward_batches(model, x, 4),
             lambda: batch_stats_logits(model, x, 4, 0)]
    for call in calls:
        with pytest.raises(TypeError, match=want):
            call()
    assert_same_state(model, before)


def test_matrix_names_the_dtype_mismatch():
    ds = sb.load("digits-labs", size=8).subset(["lab_a", "lab_b"])
    model = sb.studies.models.SmallCNN(width=4, seed=0).eval().double()
    with pytest.raises(TypeError, match=r"parameters are torch.float64 but the inputs are torch.float32"):
        sb.cross_source_matrix(model, ds, ["source", "stats:*"], progress=False)


def test_complex_inputs_are_refused():
    bn_only = nn.Sequential(nn.BatchNorm2d(1)).eval()
    z = torch.randn(8, 1, 2, 2, dtype=torch.complex64)
    for mode in ("batch", "sequential"):
        with pytest.raises(TypeError, match=r"BN layer '0' received a complex input.*x\.real"):
            collect_stats(bn_only, [z], by_source=False, mode=mode, progress=False)
    with pytest.raises(TypeError, match=r"inputs are complex \(torch.complex64\).*x\.real"):
        collect_stats(_net(), [z], by_source=False, progress=False)


def test_meta_model_is_refused_by_name():
    model = _net().to("meta")
    for call in (lambda: collect_stats(model, [X], by_source=False, progress=False),
                 lambda: precise_bn(model, [X], progress=False),
                 lambda: forward_batches(model, X, 4)):
        with pytest.raises(ValueError, match=r"meta device \('0.weight'.*to_empty"):
            call()
