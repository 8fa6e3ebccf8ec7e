"""Entry checks on datasets (``data._checks``): a ``__len__`` that lies, tensors where a dataset is expected."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import shiftbn as sb
from shiftbn.data import SourceTaggedDataset


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


class ShortData(Dataset):
    """Says 10 items, serves 6: IndexError inside its own length."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i >= 6:
            raise IndexError(f"list index {i} out of range")
        return torch.full((4,), float(i)), i % 2


class LongData(ShortData):
    """Says 6 items, serves any index: the items past its length are never read."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((4,), float(i)), i % 2


class NegativeLen(LongData):
    def __len__(self):
        return -1


class Stream(IterableDataset):
    def __iter__(self):
        yield from ((torch.randn(4), 0) for _ in range(8))


LIE = r"ShortData\[(6|7|8|9)\] raised IndexError \(list index \d out of range\) although its len\(\) is 10: its __len__"


def test_a_len_that_promises_too_many_items_names_the_dataset_and_index():
    with pytest.raises(IndexError, match=LIE):
        sb.collect_stats(_net(), ShortData(), by_source=False, batch_size=4, progress=False)
    tagged = SourceTaggedDataset(ShortData(), ["a"] * 5 + ["b"] * 5, [0, 1] * 5)
    with pytest.raises(IndexError, match=LIE):
        tagged[8]
    with pytest.raises(IndexError, match=LIE):  # through views (Subset of Subset of ...) and a DataLoader
        sb.collect_stats(_net(), tagged, batch_size=4, progress=False)
    with pytest.raises(IndexError, match=LIE):
        sb.cross_source_matrix(_net(), tagged, ["source"], progress=False)
    with pytest.raises(IndexError, match=r"index 10"):  # past its length: the caller's mistake, left alone
        tagged[10]


def test_items_past_the_length_are_never_read():
    stats = sb.collect_stats(_net(), LongData(), by_source=False, batch_size=3, progress=False)
    assert stats["pooled"].num_samples == 6
    assert len(SourceTaggedDataset(LongData(), ["a"] * 6)) == 6


def test_an_invalid_len_names_the_dataset():
    with pytest.raises(TypeError, match=r"base \(NegativeLen\) has no valid length: .*should return >= 0"):
        SourceTaggedDataset(NegativeLen(), [])
    with pytest.raises(TypeError, match=r"data \(NegativeLen\) has no valid length"):
        sb.collect_stats(_net(), NegativeLen(), by_source=False, progress=False)


@pytest.mark.parametrize("as_array", [False, True])
def test_tensors_where_a_dataset_is_expected_are_refused_saying_how_to_wrap(as_array):
    x = torch.randn(20, 4)
    y = torch.randint(0, 2, (20,))
    sources = ["a"] * 10 + ["b"] * 10
    data = x.numpy() if as_array else x
    kind = "ndarray" if as_array else "Tensor"
    with pytest.raises(TypeError, match=rf"data is a {kind} of shape \(20, 4\), not a dataset; wrap it: "
                                        r"TensorDataset\(x\).*SourceTaggedDataset\(TensorDataset\(x, y\), sources\)"):
        sb.collect_stats(_net(), data, progress=False)
    with pytest.raises(TypeError, match=r"base is a .* of shape \(20, 4\), not a dataset.*TensorDataset\(x, y\)"):
        SourceTaggedDataset(data, y, sources)  # a mistaken (x, y, sources) call read labels as sources before
    for verb in (sb.cross_source_matrix, sb.sites.recalibrate, sb.studies.train):
        with pytest.raises(TypeError, match=rf"needs a SourceTaggedDataset .*got {kind} of shape \(20, 4\); wrap"):
            verb(_net(), data)
    ok = SourceTaggedDataset(TensorDataset(x, y), sources)
    assert list(sb.collect_stats(_net(), ok, progress=False)) == ["a", "b"]
    assert np.array_equal(ok.labels, y.numpy())


def test_an_iterable_dataset_is_refused_naming_it():
    with pytest.raises(TypeError, match=r"data is an IterableDataset \(Stream\), which cannot be read by index"):
        sb.collect_stats(_net(), Stream(), progress=False)
    with pytest.raises(TypeError, match=r"base is an IterableDataset \(Stream\)"):
        SourceTaggedDataset(Stream(), ["a"] * 8)
