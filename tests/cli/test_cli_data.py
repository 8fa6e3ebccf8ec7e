"""The CLI's data options (``shiftbn.cli._user``: ``add_user_options``/``load_data``): --allow-outside, --image-size,
--normalize, --strict, --transform."""

import argparse
import os
import re
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
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


def test_the_evaluation_batch_counts_for_the_memory_check_and_is_named(tmp_path):
    from shiftbn.cli._user import add_eval_batch_option

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    p = argparse.ArgumentParser()
    add_user_options(p)
    add_eval_batch_option(p)
    args = p.parse_args(["--model", "m:f", "--weights", "w.pt", "--data", str(m), "--image-size", "8192",
                         "--eval-batch-size", "100000"])
    with pytest.raises(ValueError, match=r"--image-size 8192 with --eval-batch-size 100000: .*lower --image-size or "
                                         r"--eval-batch-size"):
        load_data(args)


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


def _transform_project(tmp_path, monkeypatch):
    """A 4x4 gray image ``a.png`` (pixel 51 = 0.2), its manifest, and a module ``user_tfs`` of transforms."""
    Image.fromarray(np.full((4, 4), 51, dtype=np.uint8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["a"]}).to_csv(m, index=False)
    (tmp_path / "user_tfs.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        seen = []

        def invert(x):  # the transform itself: one image argument
            seen.append((tuple(x.shape), float(x.min()), float(x.max())))
            return 1 - x

        def make():  # a factory: called with no arguments, returns the transform
            return lambda x: x * 3

        class Scale:  # a class, like monai.transforms.ScaleIntensity: its instance transforms
            def __init__(self, k=2.0):
                self.k = k

            def __call__(self, x):
                return x * self.k

        def as_numpy(x):
            return x.numpy().astype(np.float64)

        def broken(x):
            raise RuntimeError("boom")

        def not_a_factory():
            return 3

        def bad_factory():
            raise KeyError("weights")

        def returns_list(x):
            return [1, 2]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return m


def test_transform_runs_after_channels_and_size_and_before_normalize(tmp_path, monkeypatch):
    m = _transform_project(tmp_path, monkeypatch)
    import user_tfs

    x = load_data(_args("--data", str(m), "--channels", "3", "--image-size", "6", "--transform", "user_tfs:invert",
                        "--normalize", "0.5", "0.25"))[0][0]
    assert user_tfs.seen[-1] == ((3, 6, 6), pytest.approx(0.2), pytest.approx(0.2))  # read, --channels, --image-size
    torch.testing.assert_close(x, torch.full((3, 6, 6), ((1 - 0.2) - 0.5) / 0.25), atol=1e-6, rtol=0)  # --normalize
    for spec, value in (("user_tfs:make", 0.6), ("user_tfs:Scale", 0.4), ("user_tfs:as_numpy", 0.2)):
        y = load_data(_args("--data", str(m), "--transform", spec))[0][0]
        assert y.dtype == torch.float32 and type(y) is torch.Tensor, spec
        torch.testing.assert_close(y, torch.full((1, 4, 4), value), atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec, message", [
    ("nomodule_tfs:f", r"cannot import 'nomodule_tfs' for --transform"),
    ("user_tfs", r"--transform must look like package.module:function, got 'user_tfs'"),
    ("user_tfs:missing", r"user_tfs has no callable 'missing' for --transform"),
    ("user_tfs:not_a_factory", r"--transform user_tfs:not_a_factory: not_a_factory\(\) returned int, not a callable"),
    ("user_tfs:bad_factory", r"--transform user_tfs:bad_factory: calling it .* raised KeyError: weights"),
])
def test_transform_that_cannot_be_loaded_is_one_error_naming_the_flag(tmp_path, monkeypatch, spec, message):
    m = _transform_project(tmp_path, monkeypatch)
    with pytest.raises((ValueError, TypeError), match=message):
        load_data(_args("--data", str(m), "--transform", spec))


def test_transform_failing_on_an_image_is_one_cli_line_naming_the_image(tmp_path, monkeypatch, capsys):
    write_user_project(tmp_path, "usernet_tf", (("site_a", 40, 2), ("site_b", 150, 2)))
    _transform_project(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    common = ["stats", "--model", "usernet_tf:make", "--weights", "w.pt", "--data", "data", "--no-progress", "-q"]
    assert main([*common, "--transform", "user_tfs:invert", "--out", "ok"]) == 0
    for spec, message in (("user_tfs:broken", r"the transform \(--transform\) raised RuntimeError: boom on image "),
                          ("user_tfs:returns_list", r"the transform \(--transform\) returned list for image ")):
        assert main([*common, "--transform", spec, "--out", "bad"]) == 2
        err = capsys.readouterr().err
        assert re.search(message + r"\S+\.png", err) and len(err.strip().splitlines()) == 1, err
