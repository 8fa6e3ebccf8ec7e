import numpy as np
import pytest
import torch
from torch import nn

import shiftbn.samplers
from shiftbn.data.tagged import SourceTaggedDataset
from shiftbn.studies.training import train
from tests.timeouts import deadline


def _data(per_source=(3, 2)):
    n = sum(per_source)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 2
    base = torch.utils.data.TensorDataset(x, y)
    sources = np.repeat([f"lab_{i}" for i in range(len(per_source))], per_source)
    return SourceTaggedDataset(base, sources, labels=y.numpy())


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("batch_size", [6, 64])
def test_split_smaller_than_batch_raises_instead_of_looping(batch_size):
    with deadline(10), pytest.raises(ValueError, match=f"5 samples but batch_size={batch_size}.*batch_size <= 5"):
        train(_model(), _data(), steps=3, batch_size=batch_size, mode="random", progress=False)


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_other_modes_raise_too(mode):
    with deadline(10), pytest.raises(ValueError, match="batch_size"):
        train(_model(), _data(), steps=3, batch_size=8, mode=mode, progress=False)


def test_an_epoch_without_a_batch_raises(monkeypatch):
    monkeypatch.setattr(shiftbn.samplers.SourceBatchSampler, "__iter__", lambda self: iter(()))
    with deadline(10), pytest.raises(ValueError, match="epoch 0: .*no training batch"):
        train(_model(), _data(), steps=3, batch_size=2, progress=False)


def test_small_split_with_a_fitting_batch_trains():
    with deadline(20):
        log = train(_model(), _data(), steps=4, batch_size=5, progress=False)
    assert log["step"].tolist() == [0, 1, 2, 3] and log["epoch"].tolist() == [0, 1, 2, 3]
