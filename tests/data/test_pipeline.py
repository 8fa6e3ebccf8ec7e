"""Any data pipeline: dict/tuple items and batches, labels without an image pass, workers, batched indexing.

Every path must give the same numbers as the in-memory one (bit for bit where the arithmetic is the same).
"""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

import shiftbn as sb
from shiftbn._torch import _input_of, iter_inputs
from shiftbn.bn.plan import _split_batch, plan_batches
from shiftbn.data import ArrayDataset, FileDataset, ItemKeys


def _images(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), np.arange(n) % 3, np.array(["a", "b"] * (n // 2))


class DictItems(Dataset):
    """MONAI-style items ``{"img": x, "y": label, "site": name}``; counts reads so a label pass would show."""

    def __init__(self, x: torch.Tensor, y: np.ndarray, site: np.ndarray, with_label: bool = True) -> None:
        self.x, self.y, self.site, self.with_label = x, y, site, with_label
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        item = {"img": self.x[i], "site": self.site[i]}
        if self.with_label:
            item["y"] = int(self.y[i])
        return item


class Triples(Dataset):
    """Items ``(x, y, own_source)``: a base that carries its own (ignored) source."""

    def __init__(self, x: torch.Tensor, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple:
        return self.x[i], int(self.y[i]), "ignored"


class Bare(Dataset):
    """Inputs only, no label accessor: an unlabeled base."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48, 2), nn.BatchNorm1d(2))


def _assert_stats_close(a, b, atol: float) -> None:
    assert list(a) == list(b)
    for name in a:
        assert list(a[name]) == list(b[name])
        for layer in a[name]:
            la, lb = a[name][layer], b[name][layer]
            assert la.count == lb.count
            np.testing.assert_allclose(la.mean, lb.mean, rtol=0, atol=atol)
            np.testing.assert_allclose(la.var, lb.var, rtol=0, atol=atol)


# --- A. items of any shape ------------------------------------------------------------------------------
def test_dict_items_are_read_at_configured_keys():
    x, y, site = _images()
    ds = sb.SourceTaggedDataset(DictItems(x, y, site), site, y, keys=ItemKeys(input="img", label="y"))
    xi, yi, si = ds[5]
    assert torch.equal(xi, x[5]) and yi == y[5] and ds.source_names[si] == site[5]
    batch = next(iter(DataLoader(ds, batch_size=8)))
    assert torch.equal(batch[0], x[:8]) and batch[1].tolist() == y[:8].tolist()
    assert ds.take([3, 1]).keys == ItemKeys(input="img", label="y")  # views keep the keys


def test_dict_item_without_label_key_is_unlabeled_and_triples_ignore_their_source():
    x, y, site = _images()
    ds = sb.SourceTaggedDataset(DictItems(x, y, site, with_label=False), site, keys=ItemKeys(input="img"))
    assert ds[0][1] == -1
    tri = sb.SourceTaggedDataset(Triples(x, y), site)
    xi, yi, si = tri[3]
    assert torch.equal(xi, x[3]) and yi == y[3] and tri.source_names[si] == site[3]


def test_dict_item_without_input_key_names_keys_and_keyword():
    x, y, site = _images()
    ds = sb.SourceTaggedDataset(DictItems(x, y, site), site, y)  # default input key "image"
    with pytest.raises(ValueError, match=r"keys \['img', 'site', 'y'\].*'image'.*ItemKeys\(input='img'\)"):
        ds[0]
    with pytest.raises(TypeError, match="ItemKeys.input must be a non-empty string"):
        ItemKeys(input="")
    with pytest.raises(TypeError, match="keys must be an ItemKeys"):
        sb.SourceTaggedDataset(DictItems(x, y, site), site, keys={"input": "img"})


# --- B. labels without an image pass --------------------------------------------------------------------
def test_labels_from_metadata_column_or_label_only_callable_never_read_items():
    x, y, site = _images()
    base = DictItems(x, y, site)
    meta = pd.DataFrame({"diagnosis": y, "scanner": site})
    by_column = sb.SourceTaggedDataset(base, site, "diagnosis", metadata=meta, keys=ItemKeys(input="img"))
    by_call = sb.SourceTaggedDataset(base, site, lambda i: meta["diagnosis"].iat[i], keys=ItemKeys(input="img"))
    assert by_column.labels.tolist() == y.tolist() == by_call.labels.tolist()
    assert base.reads == 0
    unlabeled_items = DictItems(x, y, site, with_label=False)  # items then carry the given labels
    ds = sb.SourceTaggedDataset(unlabeled_items, site, "diagnosis", metadata=meta, keys=ItemKeys(input="img"))
    assert ds[4][1] == y[4] and next(iter(DataLoader(ds, batch_size=6)))[1].tolist() == y[:6].tolist()
    with pytest.raises(ValueError, match=r"metadata and base have the columns \[.diagnosis., .scanner.\]"):
        sb.SourceTaggedDataset(base, site, "label", metadata=meta)


def test_labels_from_monai_records_and_hf_columns_without_reading_items():
    x, y, site = _images()

    class Monai(DictItems):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.data = [{"img": f"p{i}.png", "y": int(v)} for i, v in enumerate(self.y)]

    class HF(DictItems):
        column_names = ["img", "y", "site"]

        def __getitem__(self, i):
            return list(self.y) if i == "y" else super().__getitem__(i)

    keys = ItemKeys(input="img", label="y")
    for cls in (Monai, HF):
        base = cls(x, y, site)
        ds = sb.SourceTaggedDataset(base, site, keys=keys)
        assert ds.labels.tolist() == y.tolist() and base.reads == 0
    parts = sb.SourceTaggedDataset.from_datasets({"h1": Monai(x[:4], y[:4], site[:4]), "h0": HF(x, y, site)}, keys=keys)
    assert parts.labels.tolist() == y.tolist() + y[:4].tolist() and parts.keys == keys
    assert torch.equal(parts[len(y)][0], x[0])
    masks = Monai(x, y, site)
    masks.data = [{"img": "p.png", "y": "mask.png"}] * len(y)  # a segmentation mask path is not a class label
    assert sb.SourceTaggedDataset(masks, site, keys=ItemKeys(input="img", label="y")).labels is None


def test_no_label_accessor_means_unlabeled_and_float_labels_are_refused():
    x, y, site = _images()
    bare = sb.SourceTaggedDataset(Bare(x), site)
    assert bare.labels is None
    with pytest.raises(ValueError, match=r"evaluation needs labels.*labels=.*metadata column.*callable"):
        bare.require_labels("evaluation")
    assert sb.SourceTaggedDataset(Bare(x), site, y).require_labels().tolist() == y.tolist()
    with pytest.raises(ValueError, match="not whole numbers"):
        sb.SourceTaggedDataset(Bare(x), site, lambda i: 0.5 * i)


# --- C. dict and tuple batches in collect_stats ---------------------------------------------------------
def test_collect_stats_dict_batches_equal_tuple_batches():
    x, y, site = _images(32)
    sid = torch.as_tensor(np.arange(32) // 16)
    tuples = [(x[i:i + 8], torch.as_tensor(y[i:i + 8]), sid[i:i + 8]) for i in range(0, 32, 8)]
    dicts = [{"image": a, "label": b, "site": s} for a, b, s in tuples]
    keys = ItemKeys(source="site")
    ref = sb.collect_stats(_net(), tuples, progress=False)
    by_default_key = [{"image": a, "label": b, "source": s} for a, b, s in tuples]
    _assert_stats_close(ref, sb.collect_stats(_net(), by_default_key, progress=False), atol=0)
    plan = plan_batches(dicts, 8, True, None, None, 0, 0, 2, keys=keys)
    got = [(bx, src) for bx, src in plan]
    want = [(bx, src) for bx, src in plan_batches(tuples, 8, True, None, None, 0, 0, 2)]
    assert [s for _, s in got] == [s for _, s in want] == ["0", "0", "1", "1"]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want, strict=True))
    assert list(ref) == ["0", "1"]
    _assert_stats_close(ref, sb.collect_stats(_net(), dicts, keys=keys, progress=False), atol=0)


def test_dict_batch_errors_name_the_keys():
    x = torch.zeros(4, 1, 4, 4)
    with pytest.raises(ValueError, match=r"keys \['img'\] but no input key 'image'"):
        _split_batch({"img": x})
    with pytest.raises(ValueError, match=r"no source key 'source'.*ItemKeys\(source=...\).*by_source=False"):
        _split_batch({"image": x, "site": torch.zeros(4)}, by_source=True)
    assert _split_batch({"image": x})[1] is None  # pooled when sources are not asked for
    assert _split_batch({"image": x}, ItemKeys(source=None), by_source=True)[1] is None  # pooled on purpose
    with pytest.raises(ValueError, match="holds no inputs"):
        _split_batch(())
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        sb.collect_stats(_net(), ["not a batch"], progress=False)
    with pytest.raises(ValueError, match="no input key 'image'"):
        sb.collect_stats(_net(), [{"img": x}], by_source=False, progress=False)


def test_input_of_reads_dict_batches_and_names_missing_key():
    x = torch.ones(2, 3)
    assert _input_of({"image": x, "label": 1}) is x
    assert _input_of({"pixels": x}, input_key="pixels") is x
    with pytest.raises(ValueError, match=r"keys \['label', 'pixels'\] but no input key 'image'"):
        _input_of({"pixels": x, "label": 1})
    with pytest.raises(ValueError, match="holds no inputs"):
        _input_of([])


# --- D. workers -----------------------------------------------------------------------------------------
def test_collect_stats_with_workers_equals_in_process():
    x, y, site = _images(32)
    ds = sb.SourceTaggedDataset(TensorDataset(x, torch.as_tensor(y)), site)
    ref = sb.collect_stats(_net(), ds, batch_size=8, progress=False)
    got = sb.collect_stats(_net(), ds, batch_size=8, num_workers=2, progress=False)
    _assert_stats_close(ref, got, atol=1e-12)
    plan = plan_batches(ds, 8, True, None, None, 0, 2, 2, persistent_workers=True)
    assert plan.loader.persistent_workers and plan.loader.num_workers == 2
    with pytest.raises(ValueError, match="persistent_workers=True .* needs num_workers > 0"):
        plan_batches(ds, 8, True, None, None, 0, 0, 2, persistent_workers=True)


def test_tagged_file_dataset_pickles_and_keeps_tags_in_workers(tmp_path):
    paths, site = [], []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4), 30 * i, dtype=np.uint8)).save(p)
        paths.append(str(p))
        site.append(f"h{i % 2}")
    ds = sb.SourceTaggedDataset(FileDataset(paths, np.arange(8) % 2), site).take([7, 0, 3, 4, 5, 2, 1, 6])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.source_ids.tolist() == ds.source_ids.tolist() and torch.equal(clone[2][0], ds[2][0])
    inline = list(DataLoader(ds, batch_size=3))
    workers = list(DataLoader(ds, batch_size=3, num_workers=2))
    for a, b in zip(inline, workers, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    got = torch.cat(list(iter_inputs(ds, [[0, 1, 2], [3, 4, 5, 6, 7]], num_workers=2)))
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(8)]))


# --- E. batched indexing --------------------------------------------------------------------------------
def _bases(x: torch.Tensor, y: np.ndarray) -> dict[str, Dataset]:
    arr, ten = ArrayDataset(x, y), TensorDataset(x, torch.as_tensor(y))
    return {"array": arr, "tensor": ten, "tensor_x_only": TensorDataset(x),
            "subset": Subset(ten, list(range(len(y) - 1, -1, -1))),
            "concat": ConcatDataset([Subset(arr, list(range(10))), Subset(ten, range(10, 24)), Triples(x, y)]),
            "bfloat16": TensorDataset(x.bfloat16(), torch.as_tensor(y)), "plain": Triples(x, y)}


@pytest.mark.parametrize("name", ["array", "tensor", "tensor_x_only", "subset", "concat", "bfloat16", "plain"])
def test_getitems_batches_equal_per_item_bit_for_bit(name, monkeypatch):
    x, y, site = _images()
    base = _bases(x, y)[name]
    ds = sb.SourceTaggedDataset(base, np.resize(site, len(base)))
    for view in (ds, ds.take([5, 3, 20, 3, 0]), ds.subset("b")):
        idx = list(range(len(view)))[::-1]
        fast = view.__getitems__(idx)
        slow = [view[i] for i in idx]
        for (a, b) in zip(DataLoader(view, batch_size=4), DataLoader(_PerItem(view), batch_size=4), strict=True):
            for u, v in zip(a, b, strict=True):
                assert u.dtype == v.dtype and torch.equal(u, v)
        for f, s in zip(fast, slow, strict=True):
            assert type(f[1]) is type(s[1]) and f[2] == s[2]
            assert torch.equal(torch.as_tensor(f[0]), torch.as_tensor(s[0]))
    if name != "plain":  # views keep the vectorised path: no per-item read of an in-memory base
        with monkeypatch.context() as m:
            for cls in (TensorDataset, ArrayDataset):
                m.setattr(cls, "__getitem__", _refuse)
            for view in (ds, ds.take([5, 3, 20, 3, 0]), ds.subset("b")):
                assert len(view.__getitems__(list(range(len(view))))) == len(view)


def _refuse(self, i):
    raise AssertionError("per-item read on the vectorised path")


def test_array_dataset_getitems_equals_getitem():
    x, y, _ = _images()
    arr = ArrayDataset(x, y)
    for (a, ya), (b, yb) in zip(arr.__getitems__([4, 1, 1]), [arr[4], arr[1], arr[1]], strict=True):
        assert torch.equal(a, b) and ya == yb and type(ya) is int


class _PerItem(Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]
