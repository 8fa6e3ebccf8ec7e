import re

import pandas as pd

from shiftbn.cli.main import main


def test_quick_demo_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Accuracy by strategy" in printed and "Report:" in printed and "lab_e" in printed
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>")
    assert "<title>shiftbn report" in html  # the report's own title, not a section's
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', html)) == 5
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
