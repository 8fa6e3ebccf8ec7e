"""The decode cache: bit-identical tables, a bounded size, and no file left behind (also on Ctrl-C)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import shiftbn.data.cache as cache_mod
from shiftbn.cli.main import main
from shiftbn.data import DecodeCache, cached, from_folder
from shiftbn.evaluate import cross_source_matrix
from tests.helpers import write_user_project

STRATEGIES = ["ema", "target", "precise", "prior:16:4:k=2", "batch:4:k=2"]


def _folder(tmp_path, n=4):
    """Three sites of ``2 n`` 6x6 RGB PNGs (two classes), shifted per site."""
    rng = np.random.default_rng(0)
    for s in range(3):
        for c in range(2):
            d = tmp_path / "png" / f"site{s}" / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.normal(60 + 50 * s + 20 * c, 30, (6, 6, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return from_folder(tmp_path / "png")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


class _Counting(Dataset):
    """A dataset counting its reads."""

    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_matrix_is_bit_identical_with_the_cache_and_decodes_each_file_once(tmp_path, tier):
    ds = _folder(tmp_path)
    plain = cross_source_matrix(_model(), ds, STRATEGIES, progress=False)
    counting = _Counting(ds.base)
    ds.base = counting
    budget = 1 << 20 if tier == "memory" else 0
    with cached(ds, budget, dir=tmp_path) as once:
        table = cross_source_matrix(_model(), once, STRATEGIES, progress=False)
        assert once.base.where == tier and once.base.hits > 3 * len(ds)
    pd.testing.assert_frame_equal(table, plain, check_exact=True)
    assert counting.reads == len(ds)  # every file decoded once for ~6 passes


def test_memory_never_exceeds_its_budget():
    # items grow: the first one's size promises they all fit, the later ones would overflow the budget
    items = [torch.zeros(4 + i) for i in range(20)]
    budget = 20 * 4 * 4 + 100
    data = DecodeCache(items, max_bytes=budget)
    for _ in range(2):
        for i in range(20):
            assert torch.equal(data[i], items[i])
            held = sum(v.nbytes for leaves, _ in data._memory.values() for v in leaves)
            assert held == data.nbytes <= budget
    assert data.where == "memory" and 0 < len(data._memory) < 20


def test_disk_file_never_exceeds_its_budget_and_serves_the_rest_uncached(tmp_path):
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64)
    base = _Counting(TensorDataset(x, torch.arange(10)))
    data = DecodeCache(base, max_bytes=0, dir=tmp_path, disk_bytes=4 * (3 * 25 * 8 + 8) + 7)  # 4 slots of x and y
    for _ in range(3):
        for i in range(10):
            got = data[i]
            assert torch.equal(got[0], x[i]) and int(got[1]) == i
    assert data.where == "disk" and data._disk.storage.numel() == data.nbytes <= 4 * (3 * 25 * 8 + 8) + 7
    assert base.reads == 4 + 3 * 6  # 4 slots cached, the 6 others read every time


class _Interrupt(nn.Module):
    """The model, raising KeyboardInterrupt (Ctrl-C) at its ``at``-th forward."""

    def __init__(self, at):
        super().__init__()
        self.net, self.at, self.calls = _model(), at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.net(x)


@pytest.mark.parametrize("named", [False, True])
def test_disk_file_is_removed_on_exit_and_on_ctrl_c_mid_matrix(tmp_path, monkeypatch, named):
    ds = _folder(tmp_path)
    folder = tmp_path / "cache"
    folder.mkdir()
    if named:  # where the OS cannot unlink a mapped file (Windows), the name lives until the block ends
        real, refused = cache_mod.os.unlink, []

        def unlink_once_refused(path):
            if not refused:
                refused.append(path)
                raise OSError("the file is in use")
            real(path)

        monkeypatch.setattr(cache_mod.os, "unlink", unlink_once_refused)
    seen = []
    model = _Interrupt(at=12)
    with pytest.raises(KeyboardInterrupt), cached(ds, 0, dir=folder) as once:
        original = once.base.base.__class__.__getitem__

        def watch(self, i, original=original):
            seen.append((once.base.where, sorted(p.name for p in folder.iterdir())))
            return original(self, i)

        monkeypatch.setattr(once.base.base.__class__, "__getitem__", watch)
        cross_source_matrix(model, once, STRATEGIES, progress=False)
    assert model.calls == 12 and once.base.where == "off" and once.base.nbytes == 0
    assert seen[-1][0] == "disk" and bool(seen[-1][1]) == named  # the file existed (by name where it must)
    assert list(folder.iterdir()) == []
    with cached(ds, 0, dir=folder) as once:
        cross_source_matrix(_model(), once, ["ema"], progress=False)
        assert once.base.where == "disk"
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "match"), [({"max_bytes": -1}, "max_bytes must be a number of bytes"),
                                                ({"max_bytes": 1.5}, "max_bytes must be"),
                                                ({"disk_bytes": -2}, "disk_bytes must be"),
                                                ({"dir": "/no/such/folder"}, "is not an existing folder")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeCache([torch.zeros(2)], **kwargs)


def test_cli_matrix_is_identical_with_and_without_the_cache_and_checks_cache_dir(tmp_path, monkeypatch, capsys):
    write_user_project(tmp_path, "usernet_cache", (("site_a", 40, 4), ("site_b", 150, 4)))
    monkeypatch.chdir(tmp_path)
    common = ["matrix", "--model", "usernet_cache:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
              "--strategies", "ema", "target", "batch:4:k=2", "--no-ci", "--no-progress", "--quiet"]
    assert main([*common, "--out", "plain", "--cache-mb", "0", "--cache-disk-mb", "0"]) == 0
    (tmp_path / "c").mkdir()
    assert main([*common, "--out", "disk", "--cache-mb", "0", "--cache-dir", "c"]) == 0
    assert main([*common, "--out", "mem"]) == 0
    plain = (tmp_path / "plain" / "matrix.csv").read_text()
    assert (tmp_path / "disk" / "matrix.csv").read_text() == plain == (tmp_path / "mem" / "matrix.csv").read_text()
    assert list((tmp_path / "c").iterdir()) == []
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    for flags in (["--cache-dir", "nowhere"], ["--cache-dir", "a_file"], ["--cache-mb", "-1"],
                  ["--cache-disk-mb", "1.5"], ["--cache-mb", "lots"]):
        assert main([*common, "--out", "x", *flags]) == 2
        err = capsys.readouterr().err
        assert f"argument {flags[0]}: " in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "x").exists()
