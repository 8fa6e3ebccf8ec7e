"""The report and the matrix on a site without labels: a decision per site first, a label-free panel, provenance."""

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import subprocess

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import shiftbn as sb  # noqa: E402
from shiftbn.cli.main import main  # noqa: E402
from shiftbn.studies.report import findings  # noqa: E402
from tests.helpers import write_user_project  # noqa: E402
from tests.studies.test_report import _chromium  # noqa: E402

COMMON = ["--model", "usernet_unlabeled:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
          "--strategies", "ema", "target", "--n-boot", "50", "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Three labeled sites (data/<site>/<class>/) and a fourth, site_d, whose folder holds images only."""
    root = tmp_path_factory.mktemp("unlabeled")
    write_user_project(root, "usernet_unlabeled", (("site_a", 40, 4), ("site_b", 90, 4), ("site_c", 150, 4)))
    rng = np.random.default_rng(1)
    (root / "data" / "site_d").mkdir()
    for i in range(8):
        arr = np.clip(rng.normal(210, 20, (8, 8)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").save(root / "data" / "site_d" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def report(project):
    """``shiftbn report --held-out site_d`` on the four sites; its folder and what it printed."""
    cwd = os.getcwd()
    os.chdir(project)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            status = main(["report", *COMMON, "--held-out", "site_d", "--out", "rep"])
    finally:
        os.chdir(cwd)
    assert status == 0
    (project / "rep" / "printed.txt").write_text(printed.getvalue())
    return project / "rep"


def test_report_on_four_sites_one_without_labels(report, project):
    html = (report / "report.html").read_text()
    # the label-free panel, each part saying what needs labels and is absent
    for part in ("BN statistics shift per layer", "label-free indicators per strategy",
                 "drift test against the training sources", "recommendation"):
        assert f"site_d, without labels: {part}" in html
    assert html.count("Absent:") >= 4
    # no accuracy cell for the unlabeled site, anywhere
    matrix = pd.read_csv(report / "matrix.csv")
    assert "site_d" not in set(matrix["eval_source"]) and set(matrix["eval_source"]) == {"site_a", "site_b", "site_c"}
    assert "site_d (n=" not in html
    # its decision: a recommendation and the exact next command
    data = json.loads((report / "report.json").read_text())
    rows = {r["source"]: r for r in data["decisions"]}
    assert set(rows) == {"site_a", "site_b", "site_c", "site_d"} and data["labels"]["site_d"] == "none"
    d = rows["site_d"]
    assert d["strategy"] in {"ema", "target"} and "chosen without labels" in d["why"] and "drift" in d["why"]
    assert "need" in d["cost"]  # the ECE and recall change need labels: said, not guessed
    expected = {"ema": "none: keep the checkpoint as it is",
                "target": "shiftbn recalibrate --model usernet_unlabeled:make --weights w.pt --data data "
                          "--target site_d --out model_site_d.pt"}
    assert d["next_command"] == expected[d["strategy"]]
    assert d["next_command"].replace("&#x27;", "'") in html.replace("&#x27;", "'")
    # the label-free ATC estimate is printed only with an error band
    indicators = re.search(r"label-free indicators per strategy</h2>.*?<tbody>(.*?)</tbody>", html, re.S).group(1)
    rows = [re.findall(r"<td>(.*?)</td>", r, re.S) for r in re.findall(r"<tr>(.*?)</tr>", indicators, re.S)]
    assert [r[0] for r in rows] == ["ema", "target"]
    for r in rows:
        assert re.fullmatch(r"\d\.\d\d ± \d\.\d\d", r[-1]) or r[-1].startswith("not "), r[-1]


def test_report_names_model_checkpoint_data_date_and_version(report, project):
    html = (report / "report.html").read_text()
    prov = json.loads((report / "report.json").read_text())["provenance"]
    sha = hashlib.sha256((project / "w.pt").read_bytes()).hexdigest()
    assert prov == {"model": "usernet_unlabeled:make", "checkpoint": "w.pt", "checkpoint_sha256": sha,
                    "data": "data", "date": datetime.date.today().isoformat(), "shiftbn_version": sb.__version__}
    title = re.search(r"<h1>(.*?)</h1>", html, re.S).group(1)
    for value in prov.values():
        assert value in title


def test_report_terminal_prints_the_decision_first(report, project, capsys, monkeypatch):
    out = (report / "printed.txt").read_text()
    assert out.startswith("Decision per source:")
    assert "site_d (labels: none)" in out and "site_a (labels: all)" in out
    assert out.index("next:") < out.index("Accuracy by strategy")
    assert "no labels, so no accuracy: site_d" in out
    monkeypatch.chdir(project)
    assert main(["report", *COMMON, "--unlabeled", "site_x", "--out", "rep3"]) == 2
    assert "--unlabeled 'site_x' is not a source" in capsys.readouterr().err


def test_matrix_held_out_with_an_unlabeled_site_equals_the_reports_cells(report, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["matrix", *COMMON, "--metrics", "accuracy", "nll", "ece", "--held-out", "site_d", "--out", "m"]) == 0
    assert "no labels, so no metric (their samples still feed statistics): site_d" in capsys.readouterr().out
    got = pd.read_csv(project / "m" / "matrix.csv")
    want = pd.read_csv(report / "matrix.csv")
    key = ["strategy", "eval_source", "metric"]
    got, want = got.sort_values(key).reset_index(drop=True), want.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[[*key, "value", "n", "ci_low", "ci_high"]],
                                  want[[*key, "value", "n", "ci_low", "ci_high"]])
    # --unlabeled: a labeled site's labels are not used, as if it had none
    assert main(["matrix", *COMMON, "--no-ci", "--unlabeled", "site_c", "--held-out", "site_d", "--out", "m2"]) == 0
    assert "no labels, so no metric (their samples still feed statistics): site_c, site_d" in capsys.readouterr().out
    assert set(pd.read_csv(project / "m2" / "matrix.csv")["eval_source"]) == {"site_a", "site_b"}


def test_decision_table_is_the_first_thing_on_the_page(report, tmp_path):
    exe = _chromium()
    probe = """<script>window.addEventListener('load', () => {
      const kids = [...document.body.children].map(e => e.tagName + '#' + e.id);
      const table = document.querySelector('#decision table');
      const pre = document.createElement('pre'); pre.id = 'probe';
      pre.textContent = JSON.stringify({kids: kids.slice(0, 3), top: table.getBoundingClientRect().top,
                                        heading: document.querySelector('#decision h2').textContent,
                                        rows: table.tBodies[0].rows.length});
      document.body.appendChild(pre);});</script>"""
    page = tmp_path / "report.html"
    page.write_text((report / "report.html").read_text().replace("<head>", "<head>" + probe, 1))
    res = subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1200,900",
                          "--virtual-time-budget=3000", "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S).group(1).replace("&quot;", '"'))
    assert got["kids"][:2] == ["H1#", "SECTION#decision"]  # the title, then the decision
    assert got["heading"] == "Decision per source" and got["rows"] == 4
    assert got["top"] < 900  # on the first screen


def _blobs_with_unlabeled(unlabel=True):
    ds = sb.load("blobs-labs", n=120, n_features=4)
    ds = ds.without_labels("lab_3") if unlabel else ds
    part = np.flatnonzero(ds.source_ids == ds.source_id("lab_2"))[::2]
    ds.labels[part] = -1  # lab_2 partly labeled
    return ds


def test_matrix_api_scores_only_labeled_samples():
    from torch import nn

    ds = _blobs_with_unlabeled()
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    kept = {}
    from shiftbn.evaluate import collect, prepare, score

    plan = prepare(ds, ["ema", "target"], train_sources=["lab_0", "lab_1"])
    ctx, labels = collect(model, plan, progress=False)
    table = score(ctx, plan, labels, ["accuracy", "ece"], ci=0.9, n_boot=20, progress=False, keep_outputs=kept)
    assert "lab_3" not in set(table["eval_source"])  # no rows for a source without labels
    assert kept["target", "lab_3"].shape[0] == len(labels["lab_3"])  # its outputs are kept for label-free use
    y = labels["lab_2"]
    row = table[(table.eval_source == "lab_2") & (table.strategy == "target") & (table.metric == "accuracy")].iloc[0]
    mask = y >= 0
    assert row["n"] == mask.sum() < len(y)
    assert row["value"] == pytest.approx(np.mean(kept["target", "lab_2"][mask].argmax(1) == y[mask]))


def test_build_report_api_with_partly_labeled_and_unlabeled_sources(tmp_path):
    from shiftbn.studies.models import MLP
    from shiftbn.studies.report import build_report

    ds = _blobs_with_unlabeled(unlabel=False)
    model = MLP(4, 3, hidden=8).eval()
    page = build_report(model, ds, tmp_path, held_out=["lab_3"], unlabeled=["lab_3"], strategies=["ema", "target"],
                        n_boot=20, progress=False)
    html = page.read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["labels"]["lab_3"] == "none" and re.fullmatch(r"\d+ of \d+", data["labels"]["lab_2"])
    assert "partly labeled (scored on the labeled part; statistics from all samples)" in html
    assert "lab_3, without labels: label-free indicators per strategy" in html
    assert data["provenance"]["model"].endswith("MLP") and len(data["provenance"]["checkpoint_sha256"]) == 64


def _mat(values, n=100, ci=0.05):
    return pd.DataFrame([{"strategy": st, "is_cross_source": False, "eval_source": src, "metric": "accuracy",
                          "value": v, "n": n, "ci_low": v - ci, "ci_high": v + ci} for (st, src), v in values.items()])


def _pairs(rows):
    return pd.DataFrame([{"eval_source": s, "strategy": st, "baseline": "ema", "metric": "accuracy", "diff": d,
                          "ci_low": lo, "ci_high": hi, "n": 100} for s, st, d, lo, hi in rows])


def test_reading_never_repeats_a_sentence_and_reports_per_site_losses_and_ece():
    m = _mat({("ema", "a"): 0.9, ("ema", "b"): 0.6, ("precise", "a"): 0.9, ("precise", "b"): 0.51,
              ("target", "a"): 0.9, ("target", "b"): 0.7})
    pooled = pd.DataFrame([{"strategy": "ema", "value": 0.75, "ci_low": 0.7, "ci_high": 0.8, "n": 200, "diff": 0.0,
                            "diff_low": 0.0, "diff_high": 0.0},
                           {"strategy": "precise", "value": 0.70, "ci_low": 0.65, "ci_high": 0.75, "n": 200,
                            "diff": -0.045, "diff_low": -0.1, "diff_high": 0.01}])
    comps = _pairs([("b", "precise", -0.09, -0.15, -0.04), ("b", "target", 0.1, 0.05, 0.15),
                    ("a", "target", 0.0, -0.02, 0.02)])
    ece = pd.DataFrame([{"eval_source": "b", "strategy": "target", "before": 0.24, "after": 0.54, "diff": 0.30,
                         "ci_low": 0.2, "ci_high": 0.4}])
    shift = pd.DataFrame({"layer": ["l1", "l2"], "depth": [0, 1], "source": ["b", "b"], "value": [2.0, 1.0]})
    paras = findings(m, shift=shift, comparisons=comps, pooled=pooled, num_classes=2, held_out=["b", "b"],
                     word="hospital", ece=ece)
    text = " ".join(paras)
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    assert len(sentences) == len(set(sentences))  # --held-out b b used to say b's sentence twice
    assert "precise on b (-9.0 points, 95% paired interval -15.0 to -4.0)" in text  # a per-site loss, not pooled away
    assert "target raises b's ECE from 0.24 to 0.54" in text
    assert not re.search(r"\b(labs?|sites?|sources?)\b", text.replace("hospital", ""))
    assert "can undo" not in text  # no causal gloss the numbers do not support


def test_from_folder_and_manifest_read_an_unlabeled_site(tmp_path):
    from shiftbn.data.files import from_folder, from_frame

    for site, cls in (("s1", "neg"), ("s1", "pos"), ("s2", None)):
        folder = tmp_path / site / (cls or "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(folder / f"{cls or 'x'}.png")
    ds = from_folder(tmp_path)
    assert ds.sources_present == ["s1", "s2"] and ds.class_names == ("neg", "pos")
    assert ds.labels[ds.source_ids == ds.source_id("s2")].tolist() == [-1]
    frame = pd.DataFrame({"path": ["a.png", "b.png", "c.png", "d.png"], "label": ["neg", "pos", None, None],
                          "hospital": ["h1", "h1", "h2", "h2"]})
    ds = from_frame(frame, source="hospital", root=tmp_path)
    assert ds.labels.tolist() == [0, 1, -1, -1]
    frame.loc[0, "label"] = None  # one empty cell among a labeled site's rows: still a mistake, named
    with pytest.raises(ValueError, match="1 missing label"):
        from_frame(frame, source="hospital", root=tmp_path)


def test_build_report_with_no_labeled_source_says_what_labels_would_give(tmp_path):
    from shiftbn.studies.models import MLP
    from shiftbn.studies.report import build_report

    ds = sb.load("blobs-labs", n=60, n_features=4)
    page = build_report(MLP(4, 3, hidden=8).eval(), ds, tmp_path, unlabeled=ds.sources_present, strategies=["ema"],
                        n_boot=20, progress=False)
    html = page.read_text()
    assert "Accuracy by strategy" not in html and "Cross-source matrix" not in html
    decisions = json.loads((tmp_path / "report.json").read_text())["decisions"]
    assert {d["recommended"] for d in decisions} == {"no recommendation"}
    assert all(d["next_command"].startswith("label some of") for d in decisions)


def test_decision_names_the_gain_its_cost_the_worst_class_and_a_per_site_loss():
    from shiftbn.studies.report.recommend import decision_table

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    ema = rng.normal(0, 1, (80, 2))
    ema[:, 1] += 3  # ema predicts class 1 for all: recall 0 for class 0, 1 for class 1
    target = np.zeros((80, 2))
    target[np.arange(80), y] = 1.0  # target right everywhere but class 1 loses a few
    target[40:50] = [1.0, 0.0]
    comps = _pairs([("b", "target", 0.375, 0.25, 0.5), ("b", "precise", -0.1, -0.2, -0.05)])
    table = decision_table(["b"], {"b": "all"}, comparisons=comps, outputs={("ema", "b"): ema, ("target", "b"): target},
                           labels={"b": y}, label_free={}, base="shiftbn recalibrate --model m:f --weights w.pt "
                           "--data d", class_names=("benign", "tumor"), n_boot=50, word="hospital")
    row = table.iloc[0]
    assert row["strategy"] == "target" and row["recommended"] == "target (the hospital's own statistics, AdaBN)"
    assert "+37.5 points [+25.0, +50.0]" in row["why"] and "worse beyond noise here: precise -10.0 points" in row["why"]
    assert row["cost"].startswith("ECE ")
    assert "worst class: tumor recall 1.00 -> 0.75 (-25.0 points, n=40)" in row["cost"]
    assert row["next_command"] == "shiftbn recalibrate --model m:f --weights w.pt --data d --target b --out model_b.pt"


def _choice(pick: str, names=("ema", "target")) -> pd.DataFrame:
    return pd.DataFrame({"strategy": list(names), "chosen": [n == pick for n in names]})


def test_a_fixed_rule_that_lost_less_than_the_chooser_on_the_labeled_sites_is_recommended():
    from shiftbn.studies.report.label_free import Validation, _why

    # the chooser picked ema on both validated sites and lost 40 and 10 points; "always target" lost 0 and 2
    rules = {"ema": {"a": 40.0, "b": 10.0}, "target": {"a": 0.0, "b": 2.0}}
    val = Validation(["a", "b"], {"a": 40.0, "b": 10.0}, rules)
    chosen, why = _why(_choice("ema"), val, None, "new", "hospital")
    assert chosen == "target"
    assert "always target lost 1.0 points on average (at most 2.0)" in why and "chooser 25.0" in why
    assert "it would pick ema here" in why and "2 labeled hospitals" in why
    # where the chooser did at least as well as every fixed rule, its pick stands (ties keep the chooser)
    val = Validation(["a", "b"], {"a": 0.0, "b": 2.0}, rules)
    chosen, why = _why(_choice("ema"), val, None, "new", "hospital")
    assert chosen == "ema" and "the chooser lost 1.0 points" in why and "no fixed rule less" in why
    # one labeled site validates nothing: the chooser's pick, with its regret unknown
    one = Validation(["a"], {"a": 40.0}, {"target": {"a": 0.0}})
    assert one.best_rule() is None and _why(_choice("ema"), one, None, "new", "hospital")[0] == "ema"


def test_validation_measures_every_fixed_rule_on_the_same_sites_as_the_chooser(project):
    from shiftbn.studies.report.label_free import validate_chooser

    model, ds = _user_model_and_data(project)
    labeled = ["site_a", "site_b", "site_c"]
    val = validate_chooser(model, ds, labeled, ["ema", "target", "precise"], calibration=0.5, seed=0)
    assert set(val.rule_regret) == {"ema", "target", "precise"}
    for site in labeled:
        regrets = {name: r[site] for name, r in val.rule_regret.items()}
        assert min(regrets.values()) == 0.0  # the best candidate there loses nothing
        assert val.regret[site] in regrets.values()  # the chooser's regret is its pick's


def _user_model_and_data(root):
    """The fixture project's model and its three labeled sites."""
    import importlib
    import sys

    import torch

    sys.path.insert(0, str(root))
    try:
        model = importlib.import_module("usernet_unlabeled").make()
    finally:
        sys.path.remove(str(root))
    model.load_state_dict(torch.load(root / "w.pt"))
    ds = sb.data.from_folder(root / "data")
    return model.eval(), ds.subset(["site_a", "site_b", "site_c"])


def test_build_report_runs_the_label_free_chooser_and_drift_through_the_users_forward(tmp_path):
    """A model called as ``model({"x": x})``: the chooser and the drift monitor of the unlabeled site's
    panel go through ``forward`` as the matrix does, and every table equals the plain model's."""
    from torch import nn

    from shiftbn.studies.models import MLP
    from shiftbn.studies.report import build_report

    class Keyed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: dict) -> torch.Tensor:
            return self.inner(batch["x"])

    ds = _blobs_with_unlabeled(unlabel=False)
    plain = MLP(4, 3, hidden=8).eval()
    keyed = Keyed(plain).eval()
    opts = {"held_out": ["lab_3"], "unlabeled": ["lab_3"], "strategies": ["ema", "target"], "n_boot": 20,
            "progress": False, "batch_size": 7, "stats_batch_size": 5}
    build_report(plain, ds, tmp_path / "plain", **opts)
    build_report(keyed, ds, tmp_path / "keyed", forward=lambda m, x: m({"x": x}), **opts)
    for name in ("matrix.csv", "shift.csv", "comparisons.csv"):  # layer names differ by the wrapper's "inner."
        keyed_table = pd.read_csv(tmp_path / "keyed" / name).replace(r"^inner\.", "", regex=True)
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "plain" / name), keyed_table)
    decided = [json.loads((tmp_path / d / "report.json").read_text().replace("inner.", ""))["decisions"]
               for d in ("plain", "keyed")]
    assert decided[0] == decided[1]
    unlabeled = [d for d in decided[0] if d["source"] == "lab_3"]
    assert len(unlabeled) == 1 and "drift" in json.dumps(unlabeled[0]).lower(), unlabeled
