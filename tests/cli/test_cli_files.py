import importlib
import os
import shutil
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import shiftbn as sb
from shiftbn.cli.main import main

SITES = ("site_a", "site_b", "site_c")


@pytest.fixture
def proj(tmp_path, monkeypatch):
    """A user's model package, a checkpoint, an image folder of three sites (``data``) and each site's
    images alone (``only_<site>``), as each site would hold them."""
    (tmp_path / "filesnet.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make(width=4):
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("filesnet", None)
    filesnet = importlib.import_module("filesnet")
    torch.save(filesnet.make().state_dict(), tmp_path / "w.pt")
    other = filesnet.make()
    with torch.no_grad():
        other[0].weight.mul_(1.01)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    rng = np.random.default_rng(0)
    for site, offset in zip(SITES, (40, 150, 90), strict=True):
        for cls in ("neg", "pos"):
            folder = tmp_path / "data" / site / cls
            folder.mkdir(parents=True)
            for i in range(4):
                arr = np.clip(rng.normal(offset + 30 * (cls == "pos"), 20, size=(8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
        shutil.copytree(tmp_path / "data" / site, tmp_path / f"only_{site}" / site)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("filesnet", None)


def _common(data="data", weights="w.pt"):
    return ["--model", "filesnet:make", "--weights", weights, "--data", data, "--batch-size", "3", "--no-progress"]


def _model_args(weights="w.pt"):
    return ["--model", "filesnet:make", "--weights", weights, "--no-progress"]


def _bn(path):
    sd = torch.load(path, weights_only=True)
    return sd["1.running_mean"], sd["1.running_var"]


def _err(capsys, status):
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_site_files_merge_and_recalibrate_as_the_images_would(proj, capsys):
    for s in SITES:  # each site on its own machine
        assert main(["stats", *_common(f"only_{s}"), "--out", f"{s}.stats", "--min-count", "8"]) == 0
    assert main(["merge", *(f"{s}.stats" for s in SITES), "--out", "all.stats"]) == 0
    assert main(["merge", *(f"{s}.stats" for s in SITES), "--out", "pooled.stats", "--pool"]) == 0
    assert sb.sites.read_stats_header("all.stats").sources == dict.fromkeys(SITES, 8)
    assert sb.sites.read_stats_header("site_a.stats").extra["batch_size"] == 3
    assert list(sb.sites.read_stats("pooled.stats")) == ["pooled"]
    # one site's statistics from the files == recalibrating on the union of the images with --target
    assert main(["recalibrate", *_model_args(), "--stats", "all.stats", "--target", "site_b", "--output", "f.pt"]) == 0
    assert main(["recalibrate", *_common(), "--target", "site_b", "--output", "d.pt"]) == 0
    for a, b in zip(_bn("f.pt"), _bn("d.pt"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # all sites pooled from the files == PreciseBN over the union of the images (one BN layer after a conv:
    # its input does not depend on how batches mix the sites)
    assert main(["recalibrate", *_model_args(), "--stats", "pooled.stats", "--output", "fp.pt"]) == 0
    assert main(["recalibrate", *_model_args(), "--stats", *(f"{s}.stats" for s in SITES), "--pool",
                 "--output", "fp2.pt"]) == 0
    assert main(["recalibrate", *_common(), "--method", "precise", "--output", "dp.pt"]) == 0
    for a, b, c in zip(_bn("fp.pt"), _bn("dp.pt"), _bn("fp2.pt"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert torch.equal(a, c)
    ref = sb.sites.read_stats("all.stats").pooled()["1"]  # and against the float64 moments themselves
    np.testing.assert_allclose(_bn("fp.pt")[0].numpy(), ref.mean, rtol=1e-6)
    np.testing.assert_allclose(_bn("fp.pt")[1].numpy(), ref.var, rtol=1e-6)
    assert not _bn("fp.pt")[0].equal(_bn("w.pt")[0])
    out = capsys.readouterr().out
    assert "Wrote pooled.stats: 1 source(s), 24 samples from 3 file(s)" in out


def test_matrix_takes_site_statistics_from_files(proj, capsys):
    for s in SITES:
        assert main(["stats", *_common(f"only_{s}"), "--out", f"{s}.stats"]) == 0
    files = [f"{s}.stats" for s in SITES]
    assert main(["matrix", *_common(), "--stats", *files, "--strategies", "ema", "target", "stats:*",
                 "--no-ci", "--out", "mx"]) == 0
    table = pd.read_csv(proj / "mx" / "matrix.csv")
    assert len(table) == 5 * 3 and set(table["n"]) == {8}  # all of --data evaluated, no calibration split
    cell = table.set_index(["strategy", "eval_source"])["value"]
    for s in SITES:  # target on s uses s's file: the same outputs as stats:s
        assert cell[("target", s)] == cell[(f"stats:{s}", s)]
    # the same as evaluating by hand with the files' statistics
    model = importlib.import_module("filesnet").make()
    model.load_state_dict(torch.load("w.pt", weights_only=True))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255)[None]
                     for p in sorted((proj / "data" / "site_c").rglob("*.png"))])
    y = torch.tensor([int("pos" in str(p)) for p in sorted((proj / "data" / "site_c").rglob("*.png"))])
    with sb.use_stats(model, sb.sites.read_stats("site_a.stats")["site_a"]), torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert cell[("stats:site_a", "site_c")] == pytest.approx(acc)
    # refusals: one line, exit 2
    for extra, msg in ((["--strategies", "precise"], "'precise' needs calibration images"),
                       (["--strategies", "tent-offline:1"], "'tent-offline:1' needs calibration images"),
                       (["--calibration", "0.3"], "drop --calibration"),
                       (["--num-samples", "4"], "drop --num-samples")):
        assert msg in _err(capsys, main(["matrix", *_common(), "--stats", *files, *extra, "--no-ci", "--out", "mx2"]))
    # the default strategies without precise (it needs the images)
    assert main(["matrix", *_common(), "--stats", *files, "--no-ci", "--out", "mx2"]) == 0
    assert set(pd.read_csv(proj / "mx2" / "matrix.csv")["strategy"]) == {"ema", "target", *(f"stats:{s}" for s in
                                                                                                 SITES)}
    err = _err(capsys, main(["matrix", *_common(), "--stats", files[0], "--strategies", "target", "--out", "mx3"]))
    assert "needs statistics of source(s) ['site_b', 'site_c']" in err


def test_statistics_file_errors_are_one_line(proj, capsys):
    assert main(["stats", *_common(), "--out", "two.stats"]) == 0
    assert main(["stats", *_common("only_site_a"), "--out", "a.stats", "--source-name", "hospital_1"]) == 0
    assert list(sb.sites.read_stats("a.stats")) == ["hospital_1"]
    capsys.readouterr()
    # the old spelling still works for one release, with a one-line note naming the new flag
    assert main(["stats", *_common("only_site_a"), "--out", "b.stats", "--site", "hospital_2"]) == 0
    assert list(sb.sites.read_stats("b.stats")) == ["hospital_2"]
    assert "shiftbn stats: note: --site is now --source-name; --site goes in the next release" in \
        capsys.readouterr().err
    assert "{'site_a': 8} hold fewer than --min-count 9 samples" in _err(
        capsys, main(["stats", *_common("only_site_a"), "--out", "small.stats", "--min-count", "9"]))
    assert not (proj / "small.stats").exists()
    assert "give each source its own file" in _err(
        capsys, main(["stats", *_common(), "--out", "x.stats", "--source-name", "h"]))
    assert "--source-name names the source in a statistics file" in _err(
        capsys, main(["stats", *_common(), "--out", "folder", "--source-name", "h"]))
    rec = ["recalibrate", *_model_args(), "--output", "r.pt"]
    assert "choose one with --target NAME or pool them all with --pool" in _err(
        capsys, main([*rec, "--stats", "two.stats"]))
    assert "another model: weights differ" in _err(
        capsys, main(["recalibrate", *_model_args("other.pt"), "--stats", "a.stats", "--output", "r.pt"]))
    assert "needs the images (--data)" in _err(capsys, main([*rec, "--stats", "a.stats", "--method", "precise"]))
    assert "--stats replaces --data" in _err(capsys, main([*rec, "--stats", "a.stats", "--data", "data"]))
    assert "needs --data (images) or --stats" in _err(capsys, main(rec))
    assert "no statistics for source 'site_z'" in _err(capsys, main([*rec, "--stats", "two.stats", "--target",
                                                                      "site_z"]))
    assert not (proj / "r.pt").exists()
    assert main([*rec, "--stats", "a.stats"]) == 0  # one source: no --target needed
    data = (proj / "two.stats").read_bytes()
    (proj / "bad.stats").write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    assert "failed its checksum" in _err(capsys, main(["merge", "bad.stats", "a.stats", "--out", "m.stats"]))
    err = _err(capsys, main(["merge", "two.stats", "two.stats", "--out", "m.stats"]))
    assert "is in both" in err and "shiftbn stats --source-name NAME" in err  # the flag of today, not the old --site
    assert main(["merge", "two.stats", "two.stats", "--merge-duplicates", "--out", "m.stats", "-q"]) == 0
    assert sb.sites.read_stats_header("m.stats").sources == {"site_a": 16, "site_b": 16, "site_c": 16}
    assert "is a folder" in _err(capsys, main(["merge", "a.stats", "--out", "data"]))


def test_merge_and_stats_never_replace_an_input_or_an_existing_file_unasked(proj, capsys):
    assert main(["stats", *_common("only_site_a"), "--out", "a.stats"]) == 0
    assert main(["stats", *_common("only_site_b"), "--out", "b.stats"]) == 0
    before = {p: (proj / p).read_bytes() for p in ("a.stats", "b.stats")}
    (proj / "sub").mkdir()
    (proj / "link.stats").symlink_to(proj / "a.stats")
    os.link(proj / "b.stats", proj / "hard.stats")
    for out in ("a.stats", "./sub/../a.stats", str(proj / "b.stats"), "link.stats", "hard.stats"):
        for force in ([], ["--force"]):  # --force replaces an existing file, never an input
            err = _err(capsys, main(["merge", "a.stats", "b.stats", "--pool", "--out", out, *force]))
            assert "is the input" in err and "merge never overwrites its input" in err, err
    err = _err(capsys, main(["merge", "link.stats", "--out", "a.stats", "--force"]))
    assert "--out a.stats is the input link.stats" in err
    assert {p: (proj / p).read_bytes() for p in before} == before
    assert main(["merge", "a.stats", "b.stats", "--out", "m.stats", "-q"]) == 0
    merged = (proj / "m.stats").read_bytes()
    assert "--out m.stats exists; pass --force" in _err(capsys, main(["merge", "a.stats", "--out", "m.stats"]))
    assert (proj / "m.stats").read_bytes() == merged
    assert main(["merge", "a.stats", "--out", "m.stats", "--force", "-q"]) == 0
    assert list(sb.sites.read_stats("m.stats")) == ["site_a"]
    # stats --out X.stats: the same rule
    assert "--out a.stats exists; pass --force" in _err(capsys, main(["stats", *_common("only_site_b"), "--out",
                                                                       "a.stats"]))
    assert (proj / "a.stats").read_bytes() == before["a.stats"]
    assert main(["stats", *_common("only_site_b"), "--out", "a.stats", "--force"]) == 0
    assert list(sb.sites.read_stats("a.stats")) == ["site_b"]
    shutil.copy(proj / "w.pt", proj / "w.stats")  # a checkpoint named like a statistics file
    err = _err(capsys, main(["stats", *_common("only_site_b", weights="w.stats"), "--out", "w.stats", "--force"]))
    assert "--out w.stats is the input w.stats; stats never overwrites its input" in err
    assert (proj / "w.stats").read_bytes() == (proj / "w.pt").read_bytes()


def test_a_fifo_among_the_statistics_files_is_refused_at_once(proj, capsys):
    from tests.timeouts import deadline

    assert main(["stats", *_common("only_site_a"), "--out", "a.stats"]) == 0
    os.mkfifo(proj / "pipe.stats")
    with deadline(20):
        err = _err(capsys, main(["merge", "a.stats", "pipe.stats", "--out", "m.stats"]))
        assert "pipe.stats is a FIFO (named pipe), not a regular file; nothing was read from it" in err
        err = _err(capsys, main(["recalibrate", *_model_args(), "--stats", "pipe.stats", "--output", "r.pt"]))
        assert "pipe.stats is a FIFO" in err
    assert not (proj / "m.stats").exists() and not (proj / "r.pt").exists()


def test_the_file_size_limit_is_named_and_leaves_no_partial_file(proj, capsys):
    import resource

    assert main(["stats", *_common(), "--out", "all.stats"]) == 0
    size = (proj / "all.stats").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # Python ignores SIGXFSZ: writes fail EFBIG
    try:
        merge = main(["merge", "all.stats", "--out", "m.stats"])
        stats = main(["stats", *_common(), "--out", "s.stats"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err.strip().splitlines()
    assert merge == 2 and stats == 2 and len(err) == 2, err
    for line, name in zip(err, ("m.stats", "s.stats"), strict=True):
        assert f"cannot write {name}: the file-size limit was hit" in line and "ulimit -f" in line, line
    assert sorted(p.name for p in proj.iterdir() if p.suffix == ".stats" or p.name.endswith(".tmp")) == ["all.stats"]


def test_recalibrate_and_merge_refuse_a_file_whose_layers_disagree_with_its_fingerprint(proj, capsys):
    from tests.sites.test_file_headers import forge_stats

    assert main(["stats", *_common("only_site_a"), "--out", "a.stats"]) == 0

    def rename(meta, arrays):  # layer '1' (the model's only BN layer) renamed; checksum recomputed
        meta["sources"][0]["layers"][0][0] = "bn"

    forge_stats(proj / "a.stats", rename, proj / "forged.stats")
    err = _err(capsys, main(["recalibrate", *_model_args(), "--stats", "forged.stats", "--output", "r.pt"]))
    assert "forged.stats is malformed: source 'site_a' layer 'bn' is no BN layer of the model" in err
    assert "forged.stats is malformed" in _err(capsys, main(["merge", "forged.stats", "--out", "m.stats"]))
    assert not (proj / "r.pt").exists() and not (proj / "m.stats").exists()
