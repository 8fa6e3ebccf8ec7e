"""Vectorised item reads (``data.items.gather``) equal per-item reads."""

import torch
from torch.utils.data import TensorDataset

import shiftbn as sb


def test_a_tensor_dataset_subclass_with_its_own_getitem_is_read_item_by_item():
    """Its items (x, target) were read as the plain TensorDataset's (x,), losing every target silently."""
    x = torch.randn(6, 2)

    class WithTargets(TensorDataset):
        def __getitem__(self, i):
            return self.tensors[0][i], 0.5 * i

    ds = sb.SourceTaggedDataset(WithTargets(x), [0, 0, 0, 1, 1, 1])
    assert [item[1] for item in ds.__getitems__([0, 4])] == [0.0, 2.0]
    assert [ds[i][1] for i in (0, 4)] == [0.0, 2.0]
