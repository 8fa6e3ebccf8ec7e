import gzip

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import shiftbn as sb
from shiftbn.data import (
    ArrayDataset,
    LabShift,
    camelyon17,
    fashion_mnist_labs,
    from_folder,
    from_frame,
    load,
    read_idx,
    simulate_labs,
    write_idx,
)
from shiftbn.data.builtin import FASHION_DEBIAN_ROOT

FASHION_MISSING = ("Debian's dataset-fashion-mnist not installed: apt-get install dataset-fashion-mnist "
                   "(make test installs it)")


def _tiny(n=12):
    x = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
    y = torch.arange(n) % 3
    return TensorDataset(x, y)


def test_items_are_x_y_source_and_names_sorted():
    ds = sb.SourceTaggedDataset(_tiny(6), ["b", "a", "b", "c", "a", "a"])
    assert ds.source_names == ("a", "b", "c")
    assert ds.source_ids.dtype == np.int64
    assert ds.source_ids.tolist() == [1, 0, 1, 2, 0, 0]
    x, y, s = ds[3]
    assert torch.equal(x, torch.tensor([6.0, 7.0])) and int(y) == 0 and s == 2
    assert ds.source_names[s] == "c"


def test_unlabeled_base_gives_minus_one_and_categorical_order():
    base = [torch.zeros(2) for _ in range(4)]
    cat = pd.Categorical(["z", "y", "z", "y"], categories=["z", "y"])
    ds = sb.SourceTaggedDataset(base, cat)
    assert ds.source_names == ("z", "y")
    assert ds[1][1] == -1 and ds[1][2] == 1
    assert ds.labels is None
    series = pd.Series(["q", "p", "q", "p"])
    assert sb.SourceTaggedDataset(base, series).source_names == ("p", "q")


def test_mixed_type_labels_keep_first_seen_order():
    ds = sb.SourceTaggedDataset(list(range(3)), [3, "a", 3])
    assert ds.source_names == ("3", "a")


def test_bad_sources_raise():
    with pytest.raises(ValueError, match="one per sample"):
        sb.SourceTaggedDataset(_tiny(4), ["a", "b"])
    with pytest.raises(ValueError, match="missing"):
        sb.SourceTaggedDataset(_tiny(2), ["a", None])
    with pytest.raises(TypeError, match="map-style"):
        sb.SourceTaggedDataset(5, [])


def test_subset_and_take_keep_ids_stable():
    ds = sb.SourceTaggedDataset(_tiny(9), ["a", "b", "c"] * 3, labels=np.arange(9) % 3)
    sub = ds.subset(["c"])
    assert sub.source_names == ds.source_names
    assert set(sub.source_ids.tolist()) == {2}
    assert sub.sources_present == ["c"]
    assert [int(sub[i][0][0]) for i in range(len(sub))] == [4, 10, 16]
    with pytest.raises(ValueError, match="known sources"):
        ds.subset("nope")


def test_from_datasets_counts_and_loader():
    a = ArrayDataset(np.zeros((3, 2)), [0, 1, 1])
    b = ArrayDataset(np.ones((2, 2)), [1, 0])
    ds = sb.SourceTaggedDataset.from_datasets({"lab_b": b, "lab_a": a})
    assert ds.source_names == ("lab_a", "lab_b")
    assert ds.labels.tolist() == [0, 1, 1, 1, 0]
    counts = ds.counts()
    assert list(counts.columns) == ["source", "label", "n"]
    assert counts.set_index(["source", "label"])["n"].to_dict() == {
        ("lab_a", 0): 1, ("lab_a", 1): 2, ("lab_b", 0): 1, ("lab_b", 1): 1}
    x, y, s = next(iter(DataLoader(ds, batch_size=5)))
    assert x.shape == (5, 2) and s.tolist() == [0, 0, 0, 1, 1]


def test_split_is_disjoint_stratified_and_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=300)
    src = rng.choice(["a", "b"], size=300)
    ds = sb.SourceTaggedDataset(ArrayDataset(np.arange(300)[:, None], y), src, y)
    sp = ds.split(fractions=(0.5, 0.25, 0.25), seed=1)
    ids = [set(int(p[i][0][0]) for i in range(len(p))) for p in (sp.train, sp.calibration, sp.test)]
    assert sum(len(s) for s in ids) == 300 and len(set.union(*ids)) == 300
    for part, frac in ((sp.train, 0.5), (sp.calibration, 0.25)):
        for name in "ab":
            for k in range(3):
                n_group = int(((src == name) & (y == k)).sum())
                got = int(((part.source_ids == ds.source_id(name)) & (part.labels == k)).sum())
                assert abs(got - frac * n_group) <= 1
    again = ds.split(fractions=(0.5, 0.25, 0.25), seed=1)
    assert np.array_equal(again.test.labels, sp.test.labels)
    with pytest.raises(ValueError, match="summing to 1"):
        ds.split(fractions=(0.5, 0.5, 0.5))


def test_idx_roundtrip_plain_and_gz(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        write_idx(tmp_path / name, arr)
        assert np.array_equal(read_idx(tmp_path / name), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + b"abc")
    with pytest.raises(ValueError, match="header declares"):
        read_idx(tmp_path / "short.gz")


def _png(path, value, size=(4, 4), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_from_folder_reads_lazily(tmp_path):
    for src, val in (("site1", 10), ("site2", 200)):
        for cls in ("benign", "tumor"):
            for i in range(2):
                _png(tmp_path / src / cls / f"{i}.png", val)
    (tmp_path / "site1" / "benign" / "notes.txt").write_text("ignored")
    ds = from_folder(tmp_path)
    assert len(ds) == 8 and ds.source_names == ("site1", "site2")
    assert ds.class_names == ("benign", "tumor")
    x, y, s = ds[7]
    assert x.shape == (1, 4, 4) and y == 1 and s == 1
    assert torch.allclose(x, torch.full((1, 4, 4), 200 / 255))
    with pytest.raises(ValueError, match="no images"):
        from_folder(tmp_path / "site1" / "benign")


def test_from_frame_csv_and_parquet(tmp_path):
    rows = []
    for i, (src, lab) in enumerate([("a", "cat"), ("b", "dog"), ("a", "dog")]):
        _png(tmp_path / f"img{i}.png", 50 * i, mode="RGB")
        rows.append({"file": f"img{i}.png", "diagnosis": lab, "site": src})
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "m.csv", index=False)
    ds = from_frame(tmp_path / "m.csv", path="file", label="diagnosis", source="site")
    assert ds.labels.tolist() == [0, 1, 1] and ds.source_ids.tolist() == [0, 1, 0]
    assert ds[2][0].shape == (3, 4, 4)
    pytest.importorskip("pyarrow")
    df.to_parquet(tmp_path / "m.parquet")
    ds2 = sb.data.from_frame(tmp_path / "m.parquet", path="file", label="diagnosis", source="site")
    assert torch.equal(ds2[1][0], ds[1][0])
    with pytest.raises(ValueError, match="lacks column"):
        from_frame(df, path="nope")


def test_the_data_names_its_sources_in_its_own_word(tmp_path):
    rows = []
    for i, src in enumerate("aab"):
        _png(tmp_path / f"img{i}.png", 50 * i)
        rows.append({"path": f"img{i}.png", "label": i % 2, "Hospital_ID": src, "source": src})
    df = pd.DataFrame(rows)
    ds = from_frame(df, source="Hospital_ID", root=tmp_path)
    assert ds.source_word == "hospital id"
    assert ds.subset("a").source_word == ds.take([0]).source_word == ds.split(seed=0).test.source_word == "hospital id"
    assert from_frame(df, root=tmp_path).source_word == "source"  # the default column
    assert load("blobs-labs", n=60).source_word == "lab" and load("digits-c").source_word == "lab"
    tagged = sb.SourceTaggedDataset(_tiny(), np.zeros(12, dtype=int), source_word="scanner")
    assert tagged.source_word == "scanner" and sb.SourceTaggedDataset(_tiny(), np.zeros(12)).source_word == "source"
    for bad in ("", "  ", None, 3):
        with pytest.raises(ValueError, match="source_word must be a non-empty word"):
            sb.SourceTaggedDataset(_tiny(), np.zeros(12), source_word=bad)


def test_camelyon17_layout(tmp_path):
    meta = pd.DataFrame({
        "patient": [4, 4, 17], "node": [4, 4, 1], "x_coord": [3328, 3360, 100], "y_coord": [21792, 21792, 7],
        "tumor": [1, 0, 1], "slide": [0, 0, 3], "center": [0, 0, 2], "split": [0, 0, 1],
    })
    meta.to_csv(tmp_path / "metadata.csv")  # WILDS writes an unnamed index column
    for p, n, x, y in meta[["patient", "node", "x_coord", "y_coord"]].itertuples(index=False):
        folder = tmp_path / "patches" / f"patient_{p:03d}_node_{n}"
        _png(folder / f"patch_patient_{p:03d}_node_{n}_x_{x}_y_{y}.png", 120, mode="RGB")
    ds = camelyon17(tmp_path)
    assert ds.source_names == ("center_0", "center_2")
    assert ds.labels.tolist() == [1, 0, 1] and ds.source_ids.tolist() == [0, 0, 1]
    assert ds[2][0].shape == (3, 4, 4)
    assert list(ds.metadata["slide"]) == [0, 0, 3]
    assert ds.class_names == ("normal", "tumor")
    with pytest.raises(FileNotFoundError, match="WILDS"):
        camelyon17(tmp_path / "missing")
    meta.drop(columns=["tumor"]).to_csv(tmp_path / "metadata.csv")  # the unlabeled companion's layout
    unlabeled = camelyon17(tmp_path)
    assert (unlabeled.labels == -1).all() and unlabeled.source_names == ("center_0", "center_2")


def test_labshift_is_deterministic_and_does_what_it_says():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(LabShift(gain=2.0, offset=0.5).apply(x), 2 * x + 0.5)
    assert torch.allclose(LabShift(gamma=2.0).apply(x), x**2)
    noisy = LabShift(noise_std=0.1, seed=3)
    assert torch.equal(noisy.apply(x), noisy.apply(x))
    assert not torch.equal(noisy.apply(x), LabShift(noise_std=0.1, seed=4).apply(x))
    blurred = LabShift(blur_sigma=1.0).apply(x)
    assert blurred.std() < x.std() and torch.isclose(blurred.mean(), x.mean(), atol=0.05)
    rgb = torch.rand(2, 3, 4, 4)
    swap = ((0, 1, 0), (1, 0, 0), (0, 0, 1))
    assert torch.allclose(LabShift(color_matrix=swap).apply(rgb), rgb[:, [1, 0, 2]])
    with pytest.raises(ValueError, match="gamma"):
        LabShift(gamma=0)


def test_simulate_labs_disjoint_with_class_prior():
    n = 4000
    y = np.arange(n) % 2
    x = np.zeros((n, 1, 2, 2), dtype=np.float32)
    labs = {"skewed": LabShift(offset=1.0, class_prior=(9, 1)), "plain": LabShift()}
    ds = simulate_labs(x, y, labs, seed=0)
    assert len(ds) == n and ds.source_names == ("plain", "skewed")
    skew = ds.subset("skewed")
    # class 0 goes to 'skewed' with p = 9/10, class 1 with p = 1/2: expect 1800 / 2800 of class 0
    assert abs(np.mean(skew.labels == 0) - 1800 / 2800) < 0.03
    assert abs(len(skew) - 2800) < 100
    assert torch.all(torch.stack([skew[i][0] for i in range(10)]) == 1.0)
    again = simulate_labs(x, y, labs, seed=0)
    assert np.array_equal(again.source_ids, ds.source_ids)
    with pytest.raises(ValueError, match="class_prior"):
        simulate_labs(x, y, {"a": LabShift(class_prior=(1, 1, 1))})


def test_builtin_digits_and_blobs():
    ds = load("digits-labs")
    assert len(ds) == 1797 and len(ds.source_names) >= 4
    x, y, s = ds[0]
    assert x.shape == (1, 16, 16) and 0 <= y <= 9
    blobs = load("blobs-labs", n=200)
    assert blobs[0][0].shape == (16,) and blobs.source_names == ("lab_0", "lab_1", "lab_2", "lab_3")
    with pytest.raises(ValueError, match="built-in datasets"):
        load("imagenet")


def test_fashion_mnist_missing_names_package_and_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*root="):
        fashion_mnist_labs(root=tmp_path)


def test_fashion_mnist_from_written_idx(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    ds = fashion_mnist_labs(root=tmp_path, n=40)
    assert len(ds) == 40 and ds[0][0].shape == (1, 28, 28)


@pytest.mark.skipif(not FASHION_DEBIAN_ROOT.exists(), reason=FASHION_MISSING)
def test_fashion_mnist_from_debian_package():
    ds = load("fashion-mnist-labs", n=500)
    assert len(ds) == 500 and ds.source_names == ("lab_a", "lab_b", "lab_c", "lab_d")


# --- class names, metadata and views (issue 9) --------------------------------------------------

def test_views_keep_class_names_and_metadata():
    meta = pd.DataFrame({"slide": [10, 11, 12, 13, 14, 15]}, index=list("uvwxyz"))
    ds = sb.SourceTaggedDataset(_tiny(6), list("ababab"), [0, 1, 0, 1, 0, 1], class_names=["cat", "dog"],
                                metadata=meta)
    assert ds.class_names == ("cat", "dog")
    assert ds.metadata["slide"].tolist() == [10, 11, 12, 13, 14, 15] and ds.metadata.index.tolist() == list(range(6))
    view = ds.take([4, 1])
    assert view.class_names == ("cat", "dog")
    assert view.metadata["slide"].tolist() == [14, 11] and view.metadata.index.tolist() == [0, 1]
    sub = ds.subset("b")
    assert sub.metadata["slide"].tolist() == [11, 13, 15] and sub.class_names == ("cat", "dog")
    sp = ds.split(fractions=(0.5, 0.5, 0.0))
    for part in (sp.train, sp.calibration, sp.test):
        assert part.class_names == ("cat", "dog") and len(part.metadata) == len(part)
        firsts = [int(part[i][0][0]) // 2 for i in range(len(part))]  # sample k holds x = [2k, 2k + 1]
        assert part.metadata["slide"].tolist() == [10 + k for k in firsts]


def test_views_preserve_subclass_and_its_attributes():
    class Scans(sb.SourceTaggedDataset):
        def scanner_of(self, i):
            return self.scanners[self.source_ids[i]]

    ds = Scans(_tiny(12), ["a", "b"] * 6)
    ds.scanners = {0: "GE", 1: "Siemens"}
    sp = ds.split(fractions=(0.5, 0.25, 0.25))
    for part in (sp.train, sp.calibration, sp.test, ds.subset("b"), ds.take([0])):
        assert type(part) is Scans and part.scanners == ds.scanners
    assert ds.subset("b").scanner_of(0) == "Siemens"
    assert repr(ds).startswith("Scans(")


def test_class_names_and_metadata_are_validated():
    with pytest.raises(ValueError, match="metadata has 2 rows for a dataset of 3 samples"):
        sb.SourceTaggedDataset(_tiny(3), list("aab"), metadata=pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(TypeError, match="metadata must be a pandas DataFrame"):
        sb.SourceTaggedDataset(_tiny(3), list("aab"), metadata={"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="label 2 has no name among the 2 class_names"):
        sb.SourceTaggedDataset(_tiny(3), list("aab"), class_names=["x", "y"])  # _tiny's labels are 0, 1, 2
    with pytest.raises(TypeError, match="sequence of names"):
        sb.SourceTaggedDataset(_tiny(3), list("aab"), class_names="xyz")
    with pytest.raises(TypeError, match="boolean mask"):
        sb.SourceTaggedDataset(_tiny(3), list("aab")).take(np.array([True, False, True]))


# --- labels are checked, never coerced silently (issue 6, issue 10) -----------------------------

def test_fractional_and_nan_labels_raise_naming_rows():
    with pytest.raises(ValueError, match=r"\[0\.5, 2\.7\] at rows 1, 3 \(0-based\).*not whole numbers"):
        sb.SourceTaggedDataset(_tiny(4), list("abab"), labels=[0, 0.5, 1, 2.7])
    with pytest.raises(ValueError, match=r"1 missing label\(s\).*at row 2 \(0-based\)"):
        sb.SourceTaggedDataset(_tiny(4), list("abab"), labels=np.array([0, 1, np.nan, 1]))
    targets = ArrayDataset(np.zeros((3, 1)), [0, 1, 1])
    targets.targets = np.array([0.0, np.inf, 1.0])
    with pytest.raises(ValueError, match="base.targets.*row 1"):
        sb.SourceTaggedDataset(targets, list("aab"))
    with pytest.raises(ValueError, match=r"negative label\(s\) \[-3\]"):
        sb.SourceTaggedDataset(_tiny(3), list("aab"), labels=[0, -3, -1])
    ok = sb.SourceTaggedDataset(_tiny(3), list("aab"), labels=np.array([0.0, 2.0, -1.0]))
    assert ok.labels.tolist() == [0, 2, -1] and ok.labels.dtype == np.int64


def test_string_labels_are_encoded_in_sorted_order():
    ds = sb.SourceTaggedDataset(_tiny(4), list("abab"), labels=["dog", "cat", "dog", "emu"])
    assert ds.labels.tolist() == [1, 0, 1, 2] and ds.class_names == ("cat", "dog", "emu")
    given = sb.SourceTaggedDataset(_tiny(2), list("ab"), labels=["dog", "cat"], class_names=["dog", "cat"])
    assert given.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"\['emu'\] at row 1.*not among class_names"):
        sb.SourceTaggedDataset(_tiny(2), list("ab"), labels=["dog", "emu"], class_names=["dog", "cat"])
    with pytest.raises(TypeError, match="mix names"):
        sb.SourceTaggedDataset(_tiny(2), list("ab"), labels=["dog", 3])


def test_tensor_dataset_second_tensor_gives_labels():
    ds = sb.SourceTaggedDataset(_tiny(6), list("aabbab"))
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.counts()["n"].sum() == 6 and "label" in ds.counts().columns
    regression = TensorDataset(torch.zeros(3, 2), torch.tensor([0.1, 0.5, 2.0]))
    assert sb.SourceTaggedDataset(regression, list("abb")).labels is None  # float targets are not class ids
    both = sb.SourceTaggedDataset.from_datasets({"a": _tiny(2), "b": _tiny(3)})
    assert both.labels.tolist() == [0, 1, 0, 1, 2]


def _manifest(tmp_path, rows, name="m.csv"):
    """Write a PNG per distinct relative path under tmp_path and the manifest CSV; returns its path."""
    df = pd.DataFrame(rows)
    for p in df["path"].unique():
        if not str(p).startswith(("/", "..")):
            _png(tmp_path / p, 7)
    df.to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_builders_fill_class_names_and_metadata(tmp_path):
    m = _manifest(tmp_path, {"path": ["a.png", "b.png", "c.png"], "label": ["dog", "cat", "dog"],
                             "source": ["s1", "s2", "s1"], "patient": [7, 8, 9]})
    ds = from_frame(m)
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [1, 0, 1]
    assert list(ds.metadata.columns) == ["patient"] and ds.subset("s1").metadata["patient"].tolist() == [7, 9]
    assert load("digits-labs", size=8).class_names == tuple("0123456789")
    labs = simulate_labs(np.zeros((4, 1, 2, 2)), [0, 1, 0, 1], {"a": LabShift()}, class_names=["neg", "pos"])
    assert labs.split(fractions=(0.5, 0.5, 0.0)).train.class_names == ("neg", "pos")


def test_manifest_labels_nan_or_fractional_raise_naming_the_file(tmp_path):
    m = _manifest(tmp_path, {"path": ["a.png", "b.png", "c.png"], "label": [0, None, 1], "source": ["s"] * 3})
    with pytest.raises(ValueError, match=r"m\.csv, column 'label': 1 missing label.*row 1 \(0-based\)"):
        from_frame(m)
    m2 = _manifest(tmp_path, {"path": ["a.png", "b.png"], "label": [0, 1.5], "source": ["s"] * 2}, "m2.csv")
    with pytest.raises(ValueError, match=r"m2\.csv, column 'label': label\(s\) \[1\.5\] at row 1"):
        from_frame(m2)


# --- files that cannot be read name themselves (issue 14, 16, 9, 21) -----------------------------

def test_undecodable_images_raise_naming_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("empty.png", "text.jpg", "cut.png"):
        with pytest.raises(ValueError, match=rf"cannot decode image .*{name}: .*remove it from the manifest"):
            sb.data.load_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="image file not found: .*gone.png"):
        sb.data.load_image(tmp_path / "gone.png")


def test_image_shape_mismatch_names_the_file(tmp_path):
    _png(tmp_path / "s" / "c" / "a.png", 1, size=(4, 4))
    _png(tmp_path / "s" / "c" / "b.png", 1, size=(4, 4), mode="RGB")
    _png(tmp_path / "s" / "c" / "c.png", 1, size=(6, 6))
    ds = from_folder(tmp_path)
    with pytest.raises(ValueError, match=r"b\.png has shape \(3, 4, 4\).*a\.png has \(1, 4, 4\).*one channels"):
        next(iter(DataLoader(ds, batch_size=3)))
    with pytest.raises(ValueError, match=r"c\.png has shape \(1, 6, 6\).*one size; resize"):
        ds[2]


def test_manifest_paths_outside_its_folder_are_refused(tmp_path):
    _png(tmp_path / "outside.png", 3)
    home = tmp_path / "data"
    m = _manifest(home, {"path": ["in.png", "sub/../in.png", "../outside.png", "../../../../etc/passwd",
                                  str(tmp_path / "outside.png")], "label": [0] * 5, "source": list("aabbc")})
    with pytest.raises(ValueError, match=r"3 path\(s\) point outside .*data.*'\.\./outside\.png'.*rows 2, 3, 4 "
                                         r"\(0-based\).*allow_outside=True \(CLI: --allow-outside\)"):
        from_frame(m, duplicates="drop")
    with pytest.raises(ValueError, match="point outside"):
        from_frame(pd.read_csv(m), root=home)
    ok = from_frame(pd.read_csv(m).iloc[[0, 2]], root=home, allow_outside=True)
    assert ok.base.paths == [str(home / "in.png"), str(tmp_path / "outside.png")]
    assert torch.equal(ok[1][0], ok[0][0] * 0 + 3 / 255)


def test_duplicate_manifest_rows_are_refused_or_dropped(tmp_path):
    rows = {"path": ["a.png", "b.png", "./a.png", "c.png", "b.png"], "label": [0, 1, 0, 1, 1],
            "source": list("xyxyy")}
    m = _manifest(tmp_path, rows)
    with pytest.raises(ValueError, match=r"lists 2 file\(s\) more than once \(2 extra row\(s\)\), e\.g\. .*a\.png "
                                         r"at rows 0, 2 \(0-based\).*a leak.*duplicates='drop'"):
        from_frame(m)
    with pytest.warns(UserWarning, match=r"2 file\(s\) more than once.*kept each file's first row"):
        ds = from_frame(m, duplicates="drop")
    assert [p.rsplit("/", 1)[-1] for p in ds.base.paths] == ["a.png", "b.png", "c.png"] and len(ds.metadata) == 3
    sp = ds.split(fractions=(0.0, 0.5, 0.5))
    assert not set(sp.calibration.base.dataset.paths[i] for i in sp.calibration.base.indices) & set(
        sp.test.base.dataset.paths[i] for i in sp.test.base.indices)
    clash = _manifest(tmp_path, {**rows, "label": [0, 1, 1, 1, 1]}, "clash.csv")
    with pytest.raises(ValueError, match="different labels or sources"):
        from_frame(clash, duplicates="drop")
    with pytest.raises(ValueError, match="duplicates must be one of"):
        from_frame(m, duplicates="keep")


def test_unreadable_manifests_name_the_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"manifest .*empty\.csv is empty"):
        from_frame(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("path,label,source\n")
    with pytest.raises(ValueError, match=r"manifest .*header\.csv has no rows"):
        from_frame(tmp_path / "header.csv")
    (tmp_path / "latin.csv").write_bytes("path,label,source\nr\u00e9sum\u00e9.png,0,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"manifest .*latin\.csv is not UTF-8 text.*save it as UTF-8"):
        from_frame(tmp_path / "latin.csv")


def test_from_folder_warns_about_what_it_skips(tmp_path):
    _png(tmp_path / "site1" / "benign" / "0.png", 5)
    (tmp_path / "site1" / "stray.png").write_bytes(b"")
    (tmp_path / "site1" / "benign" / "nested").mkdir()
    (tmp_path / "site1" / "benign" / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 entry\(ies\).*site1/benign/nested, site1/stray\.png"):
        ds = from_folder(tmp_path)
    assert len(ds) == 1


def test_truncated_gz_idx_names_the_file(tmp_path):
    write_idx(tmp_path / "x-idx3-ubyte.gz", np.zeros((50, 8, 8), dtype=np.uint8))
    data = (tmp_path / "x-idx3-ubyte.gz").read_bytes()
    (tmp_path / "cut-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte\.gz.*truncated or corrupt"):
        read_idx(tmp_path / "cut-idx3-ubyte.gz")
    (tmp_path / "plain-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x01")  # not gzip at all
    with pytest.raises(ValueError, match=r"plain-idx3-ubyte\.gz"):
        read_idx(tmp_path / "plain-idx3-ubyte.gz")
