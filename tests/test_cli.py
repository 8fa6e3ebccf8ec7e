import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import shiftbn as sb
from shiftbn.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "shiftbn.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_help_is_complete_for_every_command():
    parser = build_parser()
    top = parser.format_help()
    for cmd in ("demo", "run", "stats", "matrix", "recalibrate"):
        assert cmd in top
    sub = {a.dest: a for a in parser._actions}["command"].choices
    assert "--resume" in sub["run"].format_help() and "--quick" in sub["demo"].format_help()
    assert "never overwritten" in sub["recalibrate"].format_help()
    for cmd in ("stats", "matrix", "recalibrate"):
        text = sub[cmd].format_help()
        assert "--model" in text and "--weights" in text and "--data" in text


@pytest.mark.parametrize("args, msg", [
    (["run", "nope.toml"], "study spec not found"),
    (["stats", "--model", "nomodule:f", "--weights", "w.pt", "--data", "d.csv"], "cannot import"),
])
def test_errors_are_one_line_without_traceback(args, msg, tmp_path):
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert msg in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _user_project(tmp_path):
    """A user's own package with a model factory, a checkpoint and an image folder of two sites."""
    (tmp_path / "usernet.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    """))
    sys.path.insert(0, str(tmp_path))
    import usernet

    torch.save(usernet.make().state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    for site, offset in (("site_a", 40), ("site_b", 150)):
        for cls in ("neg", "pos"):
            folder = tmp_path / "data" / site / cls
            folder.mkdir(parents=True)
            for i in range(6):
                arr = np.clip(rng.normal(offset, 20, size=(8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    return tmp_path


def test_stats_matrix_recalibrate_on_a_users_model(tmp_path, monkeypatch):
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    common = ["--model", "usernet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4", "--no-progress"]
    assert main(["stats", *common, "--out", "st"]) == 0
    stats = sb.SourceStats.from_dict(json.loads((proj / "st" / "stats.json").read_text()))
    assert list(stats) == ["site_a", "site_b"] and stats["site_a"]["1"].count == 12 * 36
    assert set(pd.read_csv(proj / "st" / "shift.csv")["metric"]) == {"w2", "kl", "smd"}
    assert main(["matrix", *common, "--strategies", "source", "target", "--out", "mx"]) == 0
    assert len(pd.read_csv(proj / "mx" / "matrix.csv")) == 4
    before = (proj / "w.pt").read_bytes()
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "w.pt"]) == 2  # never the input
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "b.pt"]) == 0
    assert main(["recalibrate", *common, "--target", "site_b", "--output", "b.pt"]) == 2  # exists, no --force
    assert (proj / "w.pt").read_bytes() == before
    new = torch.load(proj / "b.pt", weights_only=True)
    np.testing.assert_allclose(new["1.running_mean"].numpy(), stats["site_b"]["1"].mean, rtol=1e-5)
    np.testing.assert_allclose(new["1.running_var"].numpy(), stats["site_b"]["1"].var, rtol=1e-5)
    assert main(["recalibrate", *common, "--target", "site_z", "--output", "z.pt"]) == 2
    # images of the wrong size for the model: torch's error becomes one line, exit 2
    (proj / "usernet.py").write_text((proj / "usernet.py").read_text() + textwrap.dedent("""
        def make_big():
            return nn.Sequential(nn.Flatten(), nn.Linear(100, 4), nn.BatchNorm1d(4))
    """))
    import importlib

    import usernet

    importlib.reload(usernet)
    torch.save(usernet.make_big().state_dict(), proj / "big.pt")
    assert main(["stats", "--model", "usernet:make_big", "--weights", "big.pt", "--data", "data",
                 "--no-progress", "--out", "bad"]) == 2


def _spec(tmp_path):
    spec = tmp_path / "two_cells.toml"
    spec.write_text(textwrap.dedent("""
        [study]
        protocol = "held_out_sources"
        dataset = { name = "blobs-labs", n = 400 }

        [params]
        model = { name = "MLP", hidden = 16 }
        held_out = ["lab_1", "lab_3"]
        strategies = ["source", "target"]
        steps = 150
        seeds = [0, 1]
    """))
    return spec


def test_killed_run_resumes_to_the_same_results(tmp_path):
    spec = _spec(tmp_path)
    full = _cli("run", str(spec), "--out", str(tmp_path / "full"), "--no-progress")
    assert full.returncode == 0, full.stderr
    assert (tmp_path / "full" / "figure.png").stat().st_size > 1000
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shiftbn.cli", "run", str(spec), "--out", str(tmp_path / "cut"),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = tmp_path / "cut" / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not (cells.exists() and len(list(cells.glob("*.csv"))) >= 1):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in cells.glob("*.csv"))
    assert 1 <= len(done_before) < 4, "the run must be killed midway"
    assert not (tmp_path / "cut" / "results.csv").exists()
    again = _cli("run", str(spec), "--out", str(tmp_path / "cut"), "--no-progress")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _cli("run", str(spec), "--out", str(tmp_path / "cut"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "results.csv"),
                                  pd.read_csv(tmp_path / "full" / "results.csv"))
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    computed = [e["cell"] for e in log if e["status"] == "computed"]
    assert len(computed) == len(set(computed)) == 4  # no finished cell computed twice
    skipped = {e["cell"] for e in log if e["status"] == "skipped"}
    assert len(skipped) == len(done_before)
