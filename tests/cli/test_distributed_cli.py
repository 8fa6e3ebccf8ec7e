"""`torchrun -m shiftbn stats|matrix|recalibrate|run` as 2 gloo ranks (torchrun's environment, the CLI joins the
group itself): the same files as one process, written once by rank 0; rank 1 prints nothing."""

import contextlib
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import shiftbn as sb
from shiftbn.cli.main import main
from tests.distributed_helpers import free_port, run_ranks
from tests.helpers import write_user_project

SPEC = """
[study]
protocol = "held_out_sources"
dataset = { name = "blobs-labs", n = 90 }
[params]
model = { name = "MLP", hidden = 8 }
steps = 5
seeds = [0]
strategies = ["ema", "target"]
"""


def _project(tmp_path):
    write_user_project(tmp_path, "usernet_dist", (("site_a", 40, 7), ("site_b", 150, 5), ("site_c", 90, 2)))
    (tmp_path / "tiny.toml").write_text(SPEC)
    return tmp_path


COMMON = ["--model", "usernet_dist:make", "--weights", "w.pt", "--data", "data", "--batch-size", "3", "--no-progress",
          "--threads", "1"]


def _commands(tag):
    return [["stats", *COMMON, "--out", f"st{tag}"],
            ["matrix", *COMMON, "--strategies", "ema", "precise", "target", "stats:*", "batch:3",
             "tent-offline:1", "tent",
             "--n-boot", "20", "--out", f"mx{tag}"],
            ["recalibrate", *COMMON, "--target", "site_b", "--output", f"b{tag}.pt"],
            ["run", "tiny.toml", "--out", f"run{tag}", "--no-progress", "--threads", "1"]]


def _cli(rank, world, out_dir):
    os.chdir(out_dir)
    codes, outs = [], []
    for i, argv in enumerate([*_commands(2), ["report", *COMMON, "--out", "rep"]]):
        # one torchrun job per command: a fresh rendezvous (a store reused at once can race its shutdown)
        os.environ["MASTER_PORT"] = str(int(os.environ["PORT"]) + i)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            codes.append(main(argv))
        outs.append(buf.getvalue())
    return {"codes": codes, "outs": outs}


@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_cli_under_torchrun_equals_one_process(tmp_path, capsys):
    proj = _project(tmp_path)
    env = {"RANK": "", "WORLD_SIZE": "2", "LOCAL_RANK": "", "NO_INIT": "1"}
    ranks = run_ranks(_cli_env, proj, env={**env, "PORT": str(free_port())})
    for r, res in enumerate(ranks):
        assert res["codes"] == [0, 0, 0, 0, 2], (r, res)
    assert "Wrote" in ranks[0]["outs"][0] and all(o == "" for o in ranks[1]["outs"])
    os.chdir(proj)
    for argv in _commands(1):
        assert main(argv) == 0
    capsys.readouterr()
    one = sb.SourceStats.from_dict(json.loads((proj / "st1" / "stats.json").read_text()))
    two = sb.SourceStats.from_dict(json.loads((proj / "st2" / "stats.json").read_text()))
    assert list(one) == list(two) == ["site_a", "site_b", "site_c"]
    for src in one:
        for layer, m in one[src].items():
            assert two[src][layer].count == m.count
            np.testing.assert_allclose(two[src][layer].var, m.var, rtol=1e-10)
    pd.testing.assert_frame_equal(pd.read_csv(proj / "mx2" / "matrix.csv"), pd.read_csv(proj / "mx1" / "matrix.csv"),
                                  check_exact=True)
    b1, b2 = torch.load(proj / "b1.pt", weights_only=True), torch.load(proj / "b2.pt", weights_only=True)
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-6, atol=1e-7)
    assert (proj / "run2" / "results.csv").read_bytes() == (proj / "run1" / "results.csv").read_bytes()
    assert not (proj / "rep").exists()


def _cli_env(rank, world, out_dir):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    return _cli(rank, world, out_dir)


def test_distributed_flag_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["--distributed", "stats", *COMMON, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun --nproc-per-node N -m shiftbn" in err
