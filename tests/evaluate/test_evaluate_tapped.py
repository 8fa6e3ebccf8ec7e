"""Issue #10: a dataset whose items carry labels but that exposes no label accessor is evaluated with the
labels read from the evaluation batches themselves (never an extra pass over the images)."""

import pytest
from torch.utils.data import Dataset

import shiftbn as sb
from tests.distributed_helpers import assert_same_table, tiny_data, tiny_model


class ItemsOnly(Dataset):
    """(x, y) items, no targets/labels attribute: labels are only in the items; counts item reads."""

    def __init__(self, x, y=None):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i] if self.y is None else (self.x[i], int(self.y[i]))


def items_only(labeled: sb.SourceTaggedDataset, with_labels: bool = True) -> sb.SourceTaggedDataset:
    x, y = labeled.base.tensors
    names = [labeled.source_names[i] for i in labeled.source_ids]
    return sb.SourceTaggedDataset(ItemsOnly(x, y if with_labels else None), names)


STRATS = ["ema", "target", "batch:4", "tent-offline:1", "tent", "stats:*"]


def test_labels_come_with_the_evaluation_batches():
    labeled = tiny_data()
    ds = items_only(labeled)
    assert ds.labels is None
    want = sb.cross_source_matrix(tiny_model(), labeled, STRATS, ["accuracy", "nll"], batch_size=7, transductive=True,
                                 progress=False)
    got = sb.cross_source_matrix(tiny_model(), ds, STRATS, ["accuracy", "nll"], batch_size=7, transductive=True,
                                 progress=False)
    assert_same_table(got, want)
    # reads: what the same matrix reads with given labels, plus one item per source for the early check and
    # one item whose target tells the task (a class id: classification)
    counted = items_only(labeled)
    names = [labeled.source_names[i] for i in labeled.source_ids]
    ref = sb.SourceTaggedDataset(ItemsOnly(*labeled.base.tensors), names, labeled.labels)
    sb.cross_source_matrix(tiny_model(), counted, STRATS, batch_size=7, transductive=True, progress=False)
    sb.cross_source_matrix(tiny_model(), ref, STRATS, batch_size=7, transductive=True, progress=False)
    assert counted.base.reads == ref.base.reads + 3 + 1


def test_items_without_labels_are_refused_before_any_pass():
    ds = items_only(tiny_data(), with_labels=False)
    with pytest.raises(ValueError, match=r"evaluation needs labels.*carry none.*labels="):
        sb.cross_source_matrix(tiny_model(), ds, ["ema"], progress=False)
    assert ds.base.reads <= 3 + 3  # one item per source for the task, one per source for the early check
