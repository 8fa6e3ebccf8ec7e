import json
import re

import pandas as pd
import pytest

import shiftbn.studies.demo as demo
from shiftbn.cli.main import build_parser, main


@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_quick_demo_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Accuracy by strategy" in printed and "Report:" in printed and "lab_e" in printed
    # the terminal ends with where the report is and the next command, for one's own model
    assert printed.strip().splitlines()[-2:] == [
        f"Report: {out / 'report.html'}",
        "Next, your own model: shiftbn report --model mypkg.nets:make --weights ckpt.pt --data images/ --out runs/mine"]
    # the held-out protocol (one model retrained per lab) is behind --held-out-protocol: not run by default
    assert "held-out protocol" not in captured.err and not (out / "heldout.csv").exists()
    assert not list((out / "cells").glob("heldout__*"))
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>")
    assert "<title>shiftbn report" in html  # the report's own title, not a section's
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', html)) == 4  # no held-out bars
    panel = re.search(r"<h2>Held-out labs</h2>(.*?)<h2>", html).group(1)
    assert "<img" not in panel and "Not run" in panel
    assert "shiftbn demo --held-out-protocol --quick --out runs/demo-protocol" in panel  # how to get it
    for heading in ("Findings", "Cross-source matrix", "Layer shift profile", "Held-out labs", "EMA vs PreciseBN",
                    "Sample images per lab", "Accuracy by strategy and lab", "Which statistics for each lab",
                    "Drift of each lab against the reference lab", "Drift per layer",
                    "Batch-composition audit of the training sampler"):
        assert heading in html
    assert "trained_with" in html  # the audit marks the demo's own sampler
    matrix = pd.read_csv(out / "matrix.csv")
    worst = matrix.query("strategy == 'ema' and metric == 'accuracy'").sort_values("value").iloc[0]
    assert f"the worst lab is {worst['eval_source']} at {worst['value']:.1%}" in html
    assert {"ema", "target", "prior:16", "batch:64", "tent", "stats:lab_a"} <= set(matrix["strategy"])
    assert (out / "config.json").exists() and (out / "environment.json").exists() and (out / "model.pt").exists()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2  # exists: needs --resume
    assert main(["demo", "--quick", "--out", str(out), "--resume", "--no-progress"]) == 0


def test_the_held_out_protocol_is_a_flag_recorded_in_the_config(tmp_path, monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["demo"]).held_out_protocol is False
    assert parser.parse_args(["demo", "--held-out-protocol"]).held_out_protocol is True
    assert demo.demo_config()["held_out_protocol"] is False
    seen = []
    monkeypatch.setattr(demo, "_demo", lambda run, cfg, progress: seen.append(cfg))  # the wiring only: no training
    demo.run_demo(tmp_path / "a", quick=True, held_out_protocol=True, progress=False)
    assert seen[-1]["held_out_protocol"] is True
    assert json.loads((tmp_path / "a" / "config.json").read_text())["held_out_protocol"] is True
    cfg = demo.demo_config("fashion-mnist-labs", quick=True, seed=3)
    assert demo.protocol_command(cfg) == ("shiftbn demo --held-out-protocol --dataset fashion-mnist-labs --quick "
                                          "--seed 3 --out runs/demo-protocol")
