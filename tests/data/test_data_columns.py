"""Labels and sources from columns (Hugging Face, MONAI records, metadata), tensor-valued columns, and
``source_names`` for the integer source ids of a user's batches."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.bn import collect_stats
from shiftbn.cli import main


class Column:
    """What ``datasets`` (>= 4) returns for ``ds["label"]``: a lazy column, not a list."""

    def __init__(self, values):
        self.values = values

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


class TorchFormatted(torch.utils.data.Dataset):
    """A Hugging Face ``Dataset.with_format("torch")`` in miniature: rows as dicts of tensors, columns
    iterating as 0-d tensors."""

    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.cols = {"image": torch.randn(n, 2, 4, 4, generator=g), "label": torch.arange(n) % 3,
                     "hospital": torch.tensor([0, 1, 2] * (n // 3)), "site": [f"h{i % 2}" for i in range(n)]}
        self.column_names = list(self.cols)

    def __len__(self):
        return len(self.cols["image"])

    def __getitem__(self, key):
        if isinstance(key, str):
            col = self.cols[key]
            return Column(list(col) if isinstance(col, torch.Tensor) else col)
        return {k: v[key] for k, v in self.cols.items()}


def test_labels_of_a_torch_formatted_hugging_face_dataset_are_read_from_its_column():
    ds = sb.SourceTaggedDataset(TorchFormatted(), ["a"] * 12)
    assert ds.labels.tolist() == [0, 1, 2] * 4 and ds.class_names is None
    x, y, s = ds[4]
    assert x.shape == (2, 4, 4) and int(y) == 1 and s == 0


def test_numpy_scalars_and_zero_d_tensors_are_labels_not_names():
    ds = sb.SourceTaggedDataset(torch.utils.data.TensorDataset(torch.zeros(3, 1)), ["a", "b", "a"],
                                labels=[np.int64(1), torch.tensor(0), np.float32(2.0)])
    assert ds.labels.tolist() == [1, 0, 2]


def test_sources_and_labels_name_a_column_of_the_dataset():
    base = TorchFormatted()
    ds = sb.SourceTaggedDataset(base, sources="site", labels="label")
    assert ds.source_names == ("h0", "h1") and ds.labels.tolist() == [0, 1, 2] * 4
    named = sb.SourceTaggedDataset(base, sources="hospital", source_names=["Basel", "Bern", "Zurich"])
    assert named.source_names == ("Basel", "Bern", "Zurich") and named.source_ids.tolist() == [0, 1, 2] * 4
    assert named.indices_of("Bern").tolist() == [1, 4, 7, 10]


def test_sources_name_a_metadata_column_or_monai_records():
    base = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    meta = pd.DataFrame({"hospital": ["x", "y", "x", "y"]})
    assert sb.SourceTaggedDataset(base, "hospital", metadata=meta).source_ids.tolist() == [0, 1, 0, 1]

    class Records(torch.utils.data.Dataset):  # monai.data.Dataset keeps its list of dicts as .data
        data = [{"image": torch.zeros(1), "label": 1, "site": 1}, {"image": torch.zeros(1), "label": 0, "site": 0}]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.data[i]

    ds = sb.SourceTaggedDataset(Records(), "site", source_names=["mri_a", "mri_b"])
    assert ds.source_names == ("mri_a", "mri_b") and ds.source_ids.tolist() == [1, 0] and ds.labels.tolist() == [1, 0]


def test_an_unknown_source_column_names_the_columns_there_are():
    with pytest.raises(ValueError, match=r"sources='clinic' names a column.*'hospital', 'image', 'label', 'site'"):
        sb.SourceTaggedDataset(TorchFormatted(), "clinic")
    with pytest.raises(ValueError, match="labels='y' names a column"):
        sb.SourceTaggedDataset(TorchFormatted(), "site", labels="y")
    with pytest.raises(ValueError, match="no metadata"):
        sb.SourceTaggedDataset(torch.utils.data.TensorDataset(torch.zeros(2, 1)), "site")


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))


def test_collect_stats_names_integer_source_ids_of_dict_batches():
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 2, 3, 3, generator=g), "site": torch.full((4,), s)} for s in (0, 1, 0)]
    model = _bn_net()
    plain = collect_stats(model, batches, keys=sb.ItemKeys(source="site"), progress=False)
    named = collect_stats(model, batches, keys=sb.ItemKeys(source="site"), source_names=["basel", "bern"],
                          progress=False)
    assert list(plain) == ["0", "1"] and list(named) == ["basel", "bern"]
    np.testing.assert_array_equal(named["bern"].layers["1"].mean, plain["1"].layers["1"].mean)
    with pytest.raises(ValueError, match=r"source id 1, but there are 1 source_names \['basel'\]"):
        collect_stats(model, batches, keys=sb.ItemKeys(source="site"), source_names=["basel"], progress=False)
    with pytest.raises(TypeError, match="source_names must be a non-empty list"):
        collect_stats(model, batches, keys=sb.ItemKeys(source="site"), source_names="basel", progress=False)


def test_cli_names_the_missing_library_of_a_model_name(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    status = main(["stats", "--model", "timm:resnet50d", "--weights", str(tmp_path / "w.pt"), "--data",
                   str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--model timm:resnet50d needs timm" in err and "pip install timm" in err
