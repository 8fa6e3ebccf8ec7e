"""The CLI's data options (``shiftbn.cli._user``: ``add_user_options``/``load_data``): --allow-outside, --image-size,
--normalize, --strict."""

import argparse
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from shiftbn.cli._user import add_user_options, load_data
from shiftbn.cli.main import main
from tests.helpers import write_user_project


def _args(*argv):
    p = argparse.ArgumentParser()
    add_user_options(p)
    return p.parse_args(["--model", "m:f", "--weights", "w.pt", *argv])


def _outside_manifest(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "elsewhere.png")
    (tmp_path / "data").mkdir()
    m = tmp_path / "data" / "m.csv"
    pd.DataFrame({"path": ["../elsewhere.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    return m


def test_allow_outside_flag_reaches_from_frame(tmp_path):
    m = _outside_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"point outside .*--allow-outside"):
        load_data(_args("--data", str(m)))
    ds = load_data(_args("--data", str(m), "--allow-outside"))
    assert len(ds) == 1 and ds[0][0].shape == (1, 4, 4)


@pytest.mark.parametrize("size", ["0", "-3", "8193", "100000", "ten"])
def test_image_size_is_checked_as_parsed(tmp_path, size, capsys):
    with pytest.raises(SystemExit):
        _args("--data", "m.csv", "--image-size", size)
    assert "argument --image-size: needs" in capsys.readouterr().err


def test_image_size_that_would_not_fit_in_memory_is_refused_before_reading(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    with pytest.raises(ValueError, match=r"--image-size 8192 with --batch-size 100000: .* GiB.*lower --image-size"):
        load_data(_args("--data", str(m), "--image-size", "8192", "--batch-size", "100000"))
    ds = load_data(_args("--data", str(m), "--image-size", "6"))
    assert ds[0][0].shape == (1, 6, 6)


def test_broken_image_symlinks_are_skipped_and_listed_or_refused_under_strict(tmp_path, monkeypatch, capsys):
    write_user_project(tmp_path, "usernet_links", (("site_a", 40, 3), ("site_b", 150, 3)))
    folder = tmp_path / "data" / "site_a" / "neg"
    os.symlink(tmp_path / "moved_away.png", folder / "dangling.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    monkeypatch.chdir(tmp_path)
    common = ["stats", "--model", "usernet_links:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
              "--no-progress", "--quiet"]
    assert main([*common, "--strict", "--out", "strict"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"unreadable image file \S*(dangling|loop)\.png .* and 1 more", err) and "Traceback" not in err
    assert main([*common, "--out", "st"]) == 0
    skipped = pd.read_csv(tmp_path / "st" / "skipped.csv")
    assert sorted(os.path.basename(p) for p in skipped["path"]) == ["dangling.png", "loop.png"]
    assert skipped["error"].str.contains("FileNotFoundError").any()
    assert "skipped 2 unreadable image file(s)" in capsys.readouterr().err


def test_normalize_std_must_match_the_images_channels(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    ds = load_data(_args("--data", str(m), "--normalize", "0.5", "0.2,0.2,0.2"))
    with pytest.raises(ValueError, match=r"1 channel\(s\) but mean/std have 3 values"):
        ds[0]  # a gray image divided by 3 stds would silently become 3 channels
