"""digit-collections: four real digit collections on one grid (shiftbn/data/digitcollections.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import shiftbn as sb
from shiftbn.data import digitcollections as dc


@pytest.fixture(scope="module")
def ds():
    return sb.load("digit-collections")


def test_sources_counts_labels_and_grid(ds):
    assert ds.source_names == ("mnist", "mnist_m", "optdigits", "printed")
    assert ds.source_word == "collection" and ds.class_names == tuple("0123456789")
    x = ds.base.x
    assert x.shape == (9297, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    counts = {name: np.bincount(ds.labels[ds.source_ids == s], minlength=10) for s, name in enumerate(ds.source_names)}
    for name in ("mnist", "mnist_m", "printed"):
        assert counts[name].tolist() == [250] * 10, name
    assert counts["optdigits"].sum() == 1797 and counts["optdigits"].min() >= 170
    assert np.array_equal(ds.labels, ds.base.targets)
    assert list(ds.metadata.columns) == ["collection", "origin"]
    assert (ds.metadata.collection.to_numpy() == np.asarray(ds.source_names)[ds.source_ids]).all()


def test_mnist_and_mnist_m_share_no_digit(ds):
    rows = {c: {o.split("+")[0] for o in ds.metadata.origin[ds.metadata.collection == c]} for c in ("mnist", "mnist_m")}
    assert len(rows["mnist"]) == len(rows["mnist_m"]) == 2500
    assert not rows["mnist"] & rows["mnist_m"]


def test_same_seed_same_data_bit_for_bit_and_every_call_a_fresh_copy(ds):
    again = dc._build.__wrapped__(16, 1, 0, None, dc._font_files(dc.FONTS_ROOT))
    assert torch.equal(again.base.x, ds.base.x) and np.array_equal(again.source_ids, ds.source_ids)
    assert again.metadata.equals(ds.metadata)
    copy = sb.load("digit-collections")
    copy.base.x.zero_()
    assert float(sb.load("digit-collections").base.x.sum()) == float(ds.base.x.sum()) > 0


def test_per_digit_draws_a_balanced_subset_of_the_full_collections(ds):
    small = sb.load("digit-collections", per_digit=3)
    assert small.source_names == ds.source_names and len(small) == 120
    for s in range(4):
        assert np.bincount(small.labels[small.source_ids == s], minlength=10).tolist() == [3] * 10
    full_rows = set(ds.metadata.origin[ds.metadata.collection == "mnist"])
    assert set(small.metadata.origin[small.metadata.collection == "mnist"]) <= full_rows
    assert small.metadata.origin[small.metadata.collection == "printed"].nunique() == 3  # 3 faces, not one


def test_another_seed_blends_other_patches_and_renders_otherwise():
    x_mnist, _ = dc._mnist_5k()
    a, _ = dc._blend_over_patches(x_mnist[:20], np.random.default_rng(0))
    b, _ = dc._blend_over_patches(x_mnist[:20], np.random.default_rng(1))
    assert not np.array_equal(a, b)
    faces = dc._font_files(dc.FONTS_ROOT)[:3]
    p0, p1 = (dc._render_printed(faces, 30, np.random.default_rng(seed)) for seed in (0, 1))
    assert np.array_equal(p0[1], p1[1]) and not np.array_equal(p0[0], p1[0])


def test_collections_differ_in_pixel_statistics(ds):
    """The shift is there: MNIST-M and optdigits differ from MNIST in mean and border brightness, and a
    linear classifier tells every pair of collections apart on held-out images (a classifier two-sample test)."""
    x = ds.base.x.numpy().reshape(len(ds), 16, 16)
    stats = {}
    for s, name in enumerate(ds.source_names):
        xs = x[ds.source_ids == s]
        border = np.concatenate([xs[:, 0], xs[:, -1], xs[:, :, 0], xs[:, :, -1]], axis=1)
        stats[name] = (xs.mean(), border.mean())
    for name in ("mnist_m", "optdigits"):
        assert stats[name][0] - stats["mnist"][0] > 0.1 and stats[name][1] - stats["mnist"][1] > 0.1, (name, stats)
    rng = np.random.default_rng(0)
    flat = x.reshape(len(ds), -1)
    for a, b in itertools.combinations(range(4), 2):
        rows = np.concatenate([rng.choice(np.flatnonzero(ds.source_ids == s), 300, replace=False) for s in (a, b)])
        is_b = np.repeat([0, 1], 300)
        order = rng.permutation(600)
        train, test = order[:300], order[300:]
        acc = LogisticRegression(max_iter=300).fit(flat[rows[train]], is_b[train]).score(flat[rows[test]], is_b[test])
        assert acc > 0.7, (ds.source_names[a], ds.source_names[b], acc)


def test_without_fonts_printed_is_skipped_with_a_warning_naming_the_debian_packages(tmp_path):
    """Also the colour and size options (one build for both: this one skips the rendering)."""
    with pytest.warns(UserWarning, match=r"'printed' collection is skipped.*apt-get install fonts-dejavu-core"):
        no_fonts = sb.load("digit-collections", fonts_root=tmp_path, channels=3, size=12)
    assert no_fonts.source_names == ("mnist", "mnist_m", "optdigits") and len(no_fonts) == 6797
    x = no_fonts.base.x
    assert x.shape == (6797, 3, 12, 12)
    grey = no_fonts.source_ids != no_fonts.source_names.index("mnist_m")
    assert torch.equal(x[grey, 0], x[grey, 2])
    assert not torch.equal(x[~grey, 0], x[~grey, 2])  # MNIST-M keeps its colour


def test_some_faces_missing_warns_and_uses_the_others(tmp_path):
    (tmp_path / "dejavu").mkdir()
    (tmp_path / "dejavu" / "DejaVuSans.ttf").symlink_to(dc.FONTS_ROOT / "dejavu" / "DejaVuSans.ttf")
    with pytest.warns(UserWarning, match=rf"{len(dc.PRINTED_FACES) - 1} of {len(dc.PRINTED_FACES)} font faces"):
        faces = dc._font_files(tmp_path)
    assert faces == (str(tmp_path / "dejavu" / "DejaVuSans.ttf"),)
    x, y, origin = dc._render_printed(faces, 20, np.random.default_rng(0))
    assert x.shape == (20, 28, 28) and y.tolist() == list(range(10)) * 2 and set(origin) == {"DejaVuSans.ttf"}
    assert (x.reshape(20, -1).max(axis=1) > 0.5).all()  # every image holds a glyph


@pytest.mark.parametrize(("kwargs", "match"), [({"size": 4}, "size must be an int >= 8"),
                                               ({"size": 16.0}, "size must be an int"),
                                               ({"channels": 2}, "channels must be 1"),
                                               ({"per_digit": 0}, "per_digit must be None"),
                                               ({"per_digit": 2.5}, "per_digit must be None")])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb.load("digit-collections", **kwargs)


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"needs shiftbn_no_such_package.*pip install 'shiftbn\[digits\]'"):
        dc._package_file("shiftbn_no_such_package", "data.csv")
    with pytest.raises(ImportError, match=r"has no data/no_such_file.png"):
        dc._package_file("sklearn", "data", "no_such_file.png")


def test_documented_in_datasets():
    page = Path(__file__).parents[2] / "datasets" / "digit-collections.md"
    assert "digit-collections" in (page.parent / "README.md").read_text() and page.is_file()
