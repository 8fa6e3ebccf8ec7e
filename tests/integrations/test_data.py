"""MONAI datasets (dict items, CacheDataset, worker loaders), Hugging Face ``with_format("torch")`` and
torchvision ``ImageFolder`` as shiftbn data."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import shiftbn as sb
from tests.helpers import reference_moments
from tests.integrations._lib import need


def _net(channels=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.BatchNorm2d(4)).eval()


def _records(n=12):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(1, 8, 8, generator=g) + (i % 2), "label": i % 3, "site": i % 2}
            for i in range(n)]


def _per_source_reference(model, xs, sites):
    return {s: reference_moments(model, [torch.stack([x for x, t in zip(xs, sites, strict=True) if t == s])])
            for s in sorted(set(sites))}


@pytest.mark.parametrize("kind", ["Dataset", "CacheDataset"])
def test_monai_dict_datasets_give_exact_statistics_per_site(kind):
    monai = need("monai")
    records = _records()
    cls = getattr(monai.data, kind)
    base = cls(data=records, transform=None) if kind == "Dataset" else cls(data=records, transform=None,
                                                                           progress=False)
    ds = sb.SourceTaggedDataset(base, "site", source_names=["mri_a", "mri_b"])
    assert ds.labels.tolist() == [r["label"] for r in records]
    model = _net()
    stats = sb.collect_stats(model, ds, batch_size=12, progress=False)  # one batch per site: order irrelevant
    ref = _per_source_reference(model, [r["image"] for r in records], [r["site"] for r in records])
    for sid, name in enumerate(["mri_a", "mri_b"]):
        np.testing.assert_allclose(stats[name].layers["1"].mean, ref[sid]["1"][1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(stats[name].layers["1"].var, ref[sid]["1"][2], rtol=1e-12)


def test_monai_worker_loader_of_dict_batches_with_named_sites():
    monai = need("monai")
    records = sorted(_records(), key=lambda r: r["site"])
    loader = DataLoader(monai.data.Dataset(records), batch_size=6, num_workers=2)  # single-site batches
    model = _net()
    stats = sb.collect_stats(model, loader, keys=sb.ItemKeys(source="site"), source_names=["mri_a", "mri_b"],
                             progress=False)
    assert list(stats) == ["mri_a", "mri_b"]
    ref = _per_source_reference(model, [r["image"] for r in records], [r["site"] for r in records])
    np.testing.assert_allclose(stats["mri_b"].layers["1"].mean, ref[1]["1"][1], rtol=0, atol=1e-12)


def test_hugging_face_torch_format_labels_and_sources_from_columns():
    datasets = need("datasets")
    rng = np.random.default_rng(0)
    hf = datasets.Dataset.from_dict({
        "image": rng.normal(size=(12, 1, 8, 8)).astype("float32").tolist(),
        "label": [i % 3 for i in range(12)],
        "hospital": [["basel", "bern"][i % 2] for i in range(12)],
    }).with_format("torch")
    ds = sb.SourceTaggedDataset(hf, sources="hospital")  # labels inferred from the "label" column
    assert ds.source_names == ("basel", "bern") and ds.labels.tolist() == [i % 3 for i in range(12)]
    explicit = sb.SourceTaggedDataset(hf, sources="hospital", labels="label")
    np.testing.assert_array_equal(explicit.labels, ds.labels)
    model = _net()
    stats = sb.collect_stats(model, ds, batch_size=6, progress=False)
    xs = [torch.as_tensor(v) for v in hf["image"]]
    ref = _per_source_reference(model, xs, [i % 2 for i in range(12)])
    np.testing.assert_allclose(stats["bern"].layers["1"].mean, ref[1]["1"][1], rtol=0, atol=1e-12)
    table = sb.cross_source_matrix(nn.Sequential(_net(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
                                   ds, ["ema", "target"], ["accuracy"], batch_size=6, progress=False)
    assert set(table["eval_source"]) == {"basel", "bern"}


def test_image_folder_per_site():
    tv = need("torchvision")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        parts = {}
        for site, offset in (("site_a", 60), ("site_b", 160)):
            for cls in ("neg", "pos"):
                folder = Path(tmp) / site / cls
                folder.mkdir(parents=True)
                for i in range(4):
                    arr = np.clip(rng.normal(offset, 20, size=(8, 8)), 0, 255).astype(np.uint8)
                    Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
            parts[site] = tv.datasets.ImageFolder(str(Path(tmp) / site), transform=tv.transforms.ToTensor(),
                                                  loader=lambda p: Image.open(p).convert("L"))
        ds = sb.SourceTaggedDataset.from_datasets(parts)
        assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
        model = _net()
        stats = sb.collect_stats(model, ds, batch_size=8, progress=False)
        xs = [ds[i][0] for i in range(len(ds))]
        ref = _per_source_reference(model, xs, ds.source_ids.tolist())
        np.testing.assert_allclose(stats["site_b"].layers["1"].mean, ref[1]["1"][1], rtol=0, atol=1e-12)
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        pooled = sb.collect_stats(model, loader, by_source=False, progress=False)
        assert pooled["pooled"].num_samples == 16
