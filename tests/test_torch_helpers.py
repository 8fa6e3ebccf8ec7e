"""Bottom-layer inference helpers: streaming forwards equal in-memory ones; inputs are read once and
never stacked."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import shiftbn as sb
from shiftbn._torch import forward_batches, stack_inputs
from shiftbn.bn.batchstats import batch_stats_logits
from shiftbn.studies.models import SmallCNN
from tests.helpers import assert_same_state, state_of


class CountingImages(Dataset):
    """Images (1, 8, 8) with labels; counts how often each index is read."""

    def __init__(self, n: int = 60, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.targets = np.arange(n) % 3
        self.reads: Counter = Counter()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.reads[int(i)] += 1
        return self.x[i], int(self.targets[i])


@pytest.fixture
def model():
    m = SmallCNN(1, 3, width=4)
    m.eval()
    return m


def test_streamed_outputs_equal_stacked_outputs(model):
    ds = CountingImages()
    x = stack_inputs(ds)
    torch.testing.assert_close(forward_batches(model, ds, 16), forward_batches(model, x, 16), rtol=0, atol=0)
    before = state_of(model)
    torch.testing.assert_close(batch_stats_logits(model, ds, 16, seed=3), batch_stats_logits(model, x, 16, seed=3),
                               rtol=0, atol=0)
    assert_same_state(model, before)


def test_matrix_reads_each_sample_once_per_pass_and_never_stacks_inputs(model, monkeypatch):
    base = CountingImages(90)
    ds = sb.SourceTaggedDataset(base, np.repeat(["a", "b", "c"], 30))
    cat_shapes = []
    real_cat = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        cat_shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "cat", recording_cat)
    sb.cross_source_matrix(model, ds, ["source", "target"], transductive=True, batch_size=8, progress=False)
    # one statistics pass (target) + one evaluation pass per distinct statistics (source, target)
    assert set(base.reads.values()) == {3}
    assert not [s for s in cat_shapes if len(s) > 2], cat_shapes  # only (N, K) outputs are concatenated
