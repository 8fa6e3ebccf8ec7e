"""Bit depth of image files (``load_image``): 8-bit / 255, 16-bit / 65535, float as stored or refused."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from shiftbn.data import from_folder
from shiftbn.data.images import load_image
from shiftbn.data.loaders import ImageLoader, find_unreadable


def _mode(path):
    with Image.open(path) as im:
        return im.mode


VALUES16 = np.array([[0, 32768, 65535], [1000, 4095, 12]], dtype=np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_is_divided_by_65535(tmp_path, suffix):
    path = tmp_path / f"xray{suffix}"
    Image.fromarray(VALUES16).save(path)
    assert _mode(path) == "I;16"  # what Pillow makes of it (its own 8-bit conversion clips to 255)
    x = load_image(path)
    assert x.dtype == torch.float32 and x.shape == (1, 2, 3)
    np.testing.assert_allclose(x[0].numpy(), VALUES16 / 65535.0, rtol=0, atol=1e-7)
    assert x[0, 0, 1] == pytest.approx(32768 / 65535)
    rgb = load_image(path, channels=3)
    assert rgb.shape == (3, 2, 3) and torch.equal(rgb[0], x[0]) and torch.equal(rgb[2], x[0])
    assert torch.equal(load_image(path, channels=1), x)
    assert torch.equal(ImageLoader()(path), x) and ImageLoader(channels=3, size=4)(path).shape == (3, 4, 4)


def test_big_endian_16bit_tiff_is_divided_by_65535(tmp_path):
    im = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], dtype=">u2").tobytes())
    im.save(tmp_path / "be.tif")
    np.testing.assert_allclose(load_image(tmp_path / "be.tif")[0, 0].numpy(), [0, 32768 / 65535, 1], atol=1e-7)


def test_8bit_files_are_divided_by_255(tmp_path):
    Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_allclose(load_image(tmp_path / "a.png")[0, 0].numpy(), [0, 128 / 255, 1], atol=1e-7)


def test_float_tiff_in_unit_range_is_used_as_stored(tmp_path):
    values = np.array([[0.0, 0.25, 1.0], [0.5, 1e-4, 0.9999]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert _mode(tmp_path / "f.tif") == "F"
    x = load_image(tmp_path / "f.tif")
    assert x.shape == (1, 2, 3) and torch.equal(x[0], torch.from_numpy(values))
    assert load_image(tmp_path / "f.tif", channels=3).shape == (3, 2, 3)


@pytest.mark.parametrize("values, msg", [
    (np.array([[0.0, 2.5, 400.0]], dtype=np.float32), r"f\.tif \(32-bit float\) span \[0, 400\].*rescale"),
    (np.array([[-0.5, 0.5, 1.0]], dtype=np.float32), r"span \[-0\.5, 1\].*must lie in \[0, 1\]"),
    (np.array([[0.0, np.nan, 1.0]], dtype=np.float32), r"f\.tif \(32-bit float\) include 1 NaN/inf"),
])
def test_float_tiff_outside_unit_range_is_refused_naming_the_file(tmp_path, values, msg):
    Image.fromarray(values).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=msg):
        load_image(tmp_path / "f.tif")


@pytest.mark.parametrize("dtype", [np.int32, np.int16])
def test_32bit_integer_images_are_refused_naming_the_file(tmp_path, dtype):
    Image.fromarray(np.array([[0, 5, 300]], dtype=dtype)).save(tmp_path / "i.tif")
    assert _mode(tmp_path / "i.tif") == "I"
    with pytest.raises(ValueError, match=r"i\.tif are int32 integers \(Pillow mode I\) whose range is not known.*"
                                         r"16-bit unsigned PNG"):
        load_image(tmp_path / "i.tif")


def _folder_with_broken_links(tmp_path):
    cls = tmp_path / "data" / "site_a" / "neg"
    cls.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(cls / f"{i}.png")
    os.symlink(tmp_path / "gone.png", cls / "dangling.png")
    os.symlink(cls / "loop.png", cls / "loop.png")
    return tmp_path / "data"


def test_broken_symlinks_are_kept_as_unreadable_files(tmp_path):
    root = _folder_with_broken_links(tmp_path)
    ds = from_folder(root)
    names = sorted(os.path.basename(p) for p in ds.base.paths)
    assert names == ["0.png", "1.png", "dangling.png", "loop.png"]
    bad = find_unreadable(ds.base.paths)
    assert sorted(os.path.basename(p) for p in bad["path"]) == ["dangling.png", "loop.png"]
    with pytest.raises(FileNotFoundError, match=r"dangling\.png"):
        load_image(root / "site_a" / "neg" / "dangling.png")
    with pytest.raises(ValueError, match=r"cannot decode image .*loop\.png"):
        load_image(root / "site_a" / "neg" / "loop.png")
