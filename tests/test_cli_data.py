"""The CLI's data options (``_add_user_model_args``/``_load_user_data``): --allow-outside, --image-size."""

import argparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from shiftbn.cli.main import _add_user_model_args, _load_user_data


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


@pytest.mark.parametrize("size", ["0", "-3"])
def test_image_size_must_be_positive(tmp_path, size):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    with pytest.raises(ValueError, match=rf"--image-size must be a positive number of pixels, got {size}"):
        _load_user_data(_args("--data", str(m), "--image-size", size))
    ds = _load_user_data(_args("--data", str(m), "--image-size", "6"))
    assert ds[0][0].shape == (1, 6, 6)
