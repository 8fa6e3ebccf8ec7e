"""The CLI's data options (``_add_user_model_args``/``_load_user_data``): --allow-outside, --image-size,
--normalize."""

import argparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from shiftbn.cli import _add_user_model_args, _load_user_data


def _args(*argv):
    p = argparse.ArgumentParser()
    _add_user_model_args(p)
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
        _load_user_data(_args("--data", str(m)))
    ds = _load_user_data(_args("--data", str(m), "--allow-outside"))
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
        _load_user_data(_args("--data", str(m), "--image-size", "8192", "--batch-size", "100000"))
    ds = _load_user_data(_args("--data", str(m), "--image-size", "6"))
    assert ds[0][0].shape == (1, 6, 6)


def test_normalize_std_must_match_the_images_channels(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    ds = _load_user_data(_args("--data", str(m), "--normalize", "0.5", "0.2,0.2,0.2"))
    with pytest.raises(ValueError, match=r"1 channel\(s\) but mean/std have 3 values"):
        ds[0]  # a gray image divided by 3 stds would silently become 3 channels
