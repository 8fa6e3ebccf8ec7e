"""Batch 1 for dense outputs: batch:1 and tent with one case per batch, refused where BN gets one value per channel."""

import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.adapt import BatchStats, Tent
from shiftbn.bn.batchstats import batch_stats_logits


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()


def test_batch_one_normalizes_each_image_by_its_own_statistics():
    net, x = _conv(), torch.randn(4, 1, 6, 6) * 3 + 2
    out = batch_stats_logits(net, x, 1, seed=0)
    bn = net[1]
    for i in range(4):  # independent reference: BN in training mode without running statistics, one image
        ref = nn.functional.batch_norm(net[0](x[i:i + 1]), None, None, bn.weight, bn.bias, training=True,
                                       eps=bn.eps)
        assert torch.allclose(out[i:i + 1], net[3](net[2](ref)), atol=1e-5)
    assert sb.parse_strategy("batch:1").name == "batch:1" and Tent(batch=1).batch == 1
    assert net.training is False and int(bn.num_batches_tracked) == 0


def test_batch_one_of_feature_vectors_is_refused_clearly():
    mlp = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="one value per channel"):
        batch_stats_logits(mlp, torch.randn(3, 4), 1, seed=0)
    with pytest.raises(ValueError, match="B >= 1"):
        BatchStats(0)
