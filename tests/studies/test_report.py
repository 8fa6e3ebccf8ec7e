import json
import re
import shutil
import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from shiftbn.cli.main import build_parser, main  # noqa: E402
from shiftbn.studies.report import findings, lab_samples, matrix_heatmap  # noqa: E402
from shiftbn.studies.report.html import write_report  # noqa: E402

SITES = {"site_a": (40, 1.0), "site_b": (90, 1.0), "site_c": (160, 0.5)}


def _user_project(root):
    """A user's package (model factory + checkpoint) and an image folder of three sites, three classes."""
    (root / "reportnet.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make(classes=3):
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    """))
    sys.path.insert(0, str(root))
    import reportnet

    torch.save(reportnet.make().state_dict(), root / "w.pt")
    rng = np.random.default_rng(0)
    for site, (offset, gain) in SITES.items():
        for c, cls in enumerate(("circle", "square", "plus")):
            folder = root / "data" / site / cls
            folder.mkdir(parents=True)
            for i in range(8):
                arr = np.clip(offset + gain * (20 * c + rng.normal(0, 15, size=(10, 10))), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    return root


def _hospital_manifest(proj) -> str:
    """The image folder as a manifest whose source column is called ``hospital`` (the data's own word)."""
    files = sorted((proj / "data").glob("*/*/*.png"))
    rows = [{"path": str(f.relative_to(proj / "data")), "label": f.parent.name, "hospital": f.parent.parent.name}
            for f in files]
    pd.DataFrame(rows).to_csv(proj / "data" / "manifest.csv", index=False)
    return "data/manifest.csv"


@pytest.fixture(scope="module")
def user_report(tmp_path_factory):
    proj = _user_project(tmp_path_factory.mktemp("proj"))
    cwd = __import__("os").getcwd()
    __import__("os").chdir(proj)
    try:
        status = main(["report", "--model", "reportnet:make", "--weights", "w.pt", "--data", _hospital_manifest(proj),
                       "--source-col", "hospital", "--held-out", "site_c", "--batch-size", "4", "--n-boot", "200",
                       "--out", "rep", "--no-progress"])
    finally:
        __import__("os").chdir(cwd)
    assert status == 0
    return proj / "rep"


def test_report_command_writes_the_demo_report_for_a_users_model(user_report, capsys):
    html = (user_report / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "http://" not in html and "https://" not in html
    assert "<title>shiftbn report" in html  # the report's own title, not a section's
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert imgs == ["samples", "matrix", "shift_profile", "reliability", "confusion"]
    # headings and the reading say the data's own word for a source (the manifest column "hospital")
    for heading in ("Findings", "Cross-source matrix", "Layer shift profile", "Calibration per hospital",
                    "Confusion per hospital", "Accuracy by strategy and hospital",
                    "Paired differences to the stored statistics (ema)", "Held-out hospitals (accuracy)",
                    "Calibration (ECE) per hospital", "Per-class recall per hospital", "Sample images per hospital"):
        assert heading in html
    assert "the worst hospital is" in html and "Pooled over hospitals" in html
    text = re.sub(r"<img[^>]*>", "", html).replace("site_", "")
    assert not re.search(r"\b(labs?|sites?)\b", text)  # no other word for a source
    assert "site_c (n=12)" in html  # n next to every rate: 24 images per site, half for calibration
    assert "never seen in training" in html
    assert "<th></th>" not in html  # no empty index-name header cells
    assert all(len(re.findall("<tr", head)) == 1 for head in re.findall(r"<thead>(.*?)</thead>", html, re.S))
    matrix = pd.read_csv(user_report / "matrix.csv")
    assert {"ci_low", "ci_high", "n"} <= set(matrix.columns)
    assert ((matrix["ci_low"] <= matrix["value"] + 1e-9) | (matrix["metric"] == "ece")).all()
    comparisons = pd.read_csv(user_report / "comparisons.csv")
    assert set(comparisons["eval_source"]) == set(SITES) and (comparisons["baseline"] == "ema").all()
    pooled = pd.read_csv(user_report / "pooled.csv")
    assert (pooled["n"] == 36).all() and (pooled["n_sources"] == 3).all()
    assert (user_report / "stats.json").exists() and (user_report / "shift.csv").exists()


def test_report_help_and_no_ci(tmp_path, monkeypatch):
    sub = {a.dest: a for a in build_parser()._actions}["command"].choices
    text = sub["report"].format_help()
    for flag in ("--model", "--weights", "--data", "--held-out", "--ci", "--no-ci", "--out"):
        assert flag in text
    proj = _user_project(tmp_path)
    monkeypatch.chdir(proj)
    common = ["report", "--model", "reportnet:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
              "--no-progress", "--strategies", "ema", "target"]
    assert main([*common, "--held-out", "site_x", "--out", "bad"]) == 2  # unknown site, one line
    assert main([*common, "--ci", "95", "--out", "bad"]) == 2
    assert main([*common, "--no-ci", "--out", "noci"]) == 0
    html = (proj / "noci" / "report.html").read_text()
    assert "within noise of chance level (1/3" in html  # an untrained model: no strategy ranked
    assert "ci_low" not in pd.read_csv(proj / "noci" / "matrix.csv")


def _matrix(values: dict, n=100, ci=0.05) -> pd.DataFrame:
    rows = [{"strategy": st, "is_cross_source": False, "eval_source": src, "metric": "accuracy", "value": v, "n": n,
             "ci_low": v - ci, "ci_high": v + ci} for (st, src), v in values.items()]
    return pd.DataFrame(rows)


def _pairs(rows) -> pd.DataFrame:
    return pd.DataFrame([{"eval_source": s, "strategy": st, "baseline": "ema", "metric": "accuracy", "diff": d,
                          "ci_low": lo, "ci_high": hi, "n": 100} for s, st, d, lo, hi in rows])


def test_findings_say_within_noise_when_the_paired_interval_includes_zero():
    m = _matrix({("ema", "a"): 0.9, ("ema", "b"): 0.6, ("target", "a"): 0.9, ("target", "b"): 0.63})
    text = " ".join(findings(m, comparisons=_pairs([("b", "target", 0.03, -0.01, 0.07)]), num_classes=2))
    assert "the worst source is b at 60.0%" in text and "n=100" in text
    assert "the worst lab is b at 60.0%" in " ".join(findings(m, num_classes=2, word="lab"))
    assert "within noise (95% interval of the difference, -1.0 to +7.0, includes 0)" in text
    assert "the largest gain" not in text
    assert "no paired interval was computed, so no difference is claimed" in " ".join(findings(m, num_classes=2))
    text = " ".join(findings(m, comparisons=_pairs([("b", "target", 0.03, 0.01, 0.05)]), num_classes=2))
    assert "the largest gain over the stored statistics (ema) is target's (+3.0 points, 95% paired interval" in text


def test_findings_at_chance_rank_no_strategy():
    m = _matrix({("ema", "a"): 0.12, ("ema", "b"): 0.09, ("target", "a"): 0.2, ("target", "b"): 0.3})
    pooled = pd.DataFrame([{"strategy": "ema", "value": 0.105, "ci_low": 0.07, "ci_high": 0.14, "n": 200},
                           {"strategy": "target", "value": 0.25, "ci_low": 0.2, "ci_high": 0.3, "n": 200}])
    text = " ".join(findings(m, comparisons=_pairs([("b", "target", 0.21, 0.1, 0.3)]), pooled=pooled,
                             num_classes=10))
    assert "within noise of chance level (1/10 = 10.0%)" in text
    assert "target" not in text  # nothing ranked
    # without a pooled table the check uses the matrix counts
    assert "within noise of chance" in " ".join(findings(m, num_classes=10))
    assert "within noise of chance" not in " ".join(findings(m, num_classes=2)[:1])


def test_html_tables_have_one_header_row(tmp_path):
    t = pd.DataFrame({"strategy": ["s", "t"], "eval_source": ["a", "a"], "value": [0.5, 0.6]})
    pivot = t.pivot_table(index="strategy", columns="eval_source", values="value")
    out = write_report(tmp_path / "r.html", title="t", summary=["x"], figures={}, tables={"p": pivot},
                       meta={}, captions={"p": "a caption"})
    html = out.read_text()
    assert len(re.findall("<tr", re.search(r"<thead>(.*?)</thead>", html, re.S).group(1))) == 1
    assert "<th>strategy</th>" in html and '<p class="caption">a caption</p>' in html


def test_heatmap_has_a_colour_bar_and_marks_held_out_sites():
    m = _matrix({("ema", "a"): 0.9, ("ema", "b"): 0.6, ("target", "a"): 0.9, ("target", "b"): 0.7})
    fig = matrix_heatmap(m, held_out=["b"])
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["a", "b\n(held out)"]
    assert "[0.85, 0.95]" in [t.get_text().split("\n")[1] for t in fig.axes[0].texts]


def test_study_figures_call_a_source_what_the_data_calls_it():
    from shiftbn.studies import HeldOutSources
    from shiftbn.studies.report import study_figure

    table = pd.DataFrame({"held_out": ["a", "b"], "is_held_out": [True, True], "strategy": ["ema", "ema"],
                          "metric": ["accuracy"] * 2, "value": [0.5, 0.7]})
    fig = study_figure(HeldOutSources.figure, table, word="collection")
    assert fig._suptitle.get_text() == "Held-out collection performance by recalibration strategy"
    assert fig.axes[0].get_xlabel() == "held-out collection (never seen in training)"
    matplotlib.pyplot.close(fig)


def test_sample_images_are_scaled_per_lab():
    import shiftbn as sb

    ds = sb.load("digits-labs")
    fig = lab_samples(ds, per_lab=3)
    for ax in fig.axes:
        for im in ax.get_images():
            arr = np.asarray(im.get_array())
            assert arr.max() > 0.5  # no lab near-black, whatever its gain
    assert "own 1st-99th percentile" in fig._suptitle.get_text()


INJECT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const __err = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __err(...a); };
window.addEventListener('load', () => {
  const sizes = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight,
                                                 shown: i.getBoundingClientRect().width}));
  const pre = document.createElement('pre'); pre.id = 'shiftbn-check';
  const complete = [...document.images].every(i => i.complete);
  pre.textContent = JSON.stringify({sizes: sizes, errors: window.__errors, complete: complete});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    # not a skip: CI installs chromium (.ci/run), and a report nobody opened in a browser is untested
    assert exe, "chromium is not installed: apt-get install -y chromium (the CI script does this)"
    return exe


def test_report_renders_in_headless_chromium(user_report, tmp_path):
    exe = _chromium()
    page = tmp_path / "report.html"
    page.write_text((user_report / "report.html").read_text().replace("<head>", "<head>" + INJECT, 1))
    flags = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--window-size=1200,3000",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    res = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    check = re.search(r'<pre id="shiftbn-check">(.*?)</pre>', res.stdout, re.S)
    assert check, res.stdout[-2000:]
    got = json.loads(check.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert got["errors"] == [] and got["complete"]
    assert len(got["sizes"]) == 5
    for img in got["sizes"]:
        assert img["w"] > 100 and img["h"] > 100 and img["shown"] > 100, img
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "shot.png"
    res = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and shot.stat().st_size > 10_000
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1200) and pixels.std() > 10  # something was drawn, not a blank page


def test_report_on_three_sites_with_a_corrupt_a_grayscale_and_an_odd_size_file(tmp_path, monkeypatch):
    """Issue 13's acceptance: the user's report on a messy folder, with intervals and the skipped file."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image
    from torch import nn

    from shiftbn.cli.main import main

    (tmp_path / "netmod.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    for k, site in enumerate(("site_a", "site_b", "site_c")):
        for cls in ("neg", "pos"):
            folder = tmp_path / "data" / site / cls
            folder.mkdir(parents=True)
            for i in range(8):
                arr = np.clip(rng.normal(60 + 50 * k + 30 * (cls == "pos"), 25, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="RGB").save(folder / f"{i}.png")
    (tmp_path / "data" / "site_a" / "neg" / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.full((8, 8), 90, np.uint8), mode="L").save(tmp_path / "data" / "site_b" / "pos" / "gray.png")
    odd = np.full((11, 13, 3), 90, np.uint8)
    Image.fromarray(odd, mode="RGB").save(tmp_path / "data" / "site_c" / "neg" / "odd.png")
    monkeypatch.chdir(tmp_path)
    args = ["report", "--model", "netmod:make", "--weights", "w.pt", "--data", "data", "--channels", "3",
            "--image-size", "8", "--strategies", "ema", "target", "--n-boot", "200", "--batch-size", "4",
            "--no-progress", "--quiet", "--out", "rep"]
    assert main(args) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "interval" in html
    matrix = pd.read_csv(tmp_path / "rep" / "matrix.csv")
    assert {"ci_low", "ci_high", "n"} <= set(matrix.columns) and (matrix["ci_low"] <= matrix["value"]).all()
    skipped = pd.read_csv(tmp_path / "rep" / "skipped.csv")
    assert [p.rsplit("/", 1)[-1] for p in skipped["path"]] == ["broken.png"]


def test_report_refuses_only_cross_source_strategies(tmp_path):
    import pytest

    import shiftbn as sb
    from shiftbn.studies.models import MLP
    from shiftbn.studies.report import build_report

    ds = sb.load("blobs-labs", n=80)
    with pytest.raises(ValueError, match="at least one strategy that is not stats:<source>"):
        build_report(MLP(16, 3, hidden=8).eval(), ds, tmp_path, strategies=["stats:*"], ci=None, progress=False)


def test_report_skips_a_one_image_site_naming_it(tmp_path, monkeypatch, capsys):
    """A site of one image has nothing left to evaluate once it calibrates: it is skipped with a warning."""
    from tests.helpers import write_user_project

    write_user_project(tmp_path, "usernet_onesite", (("site_a", 40, 4), ("site_b", 150, 4)))
    lone = tmp_path / "data" / "site_c" / "neg"
    lone.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 90, np.uint8), mode="L").save(lone / "0.png")
    monkeypatch.chdir(tmp_path)
    args = ["report", "--model", "usernet_onesite:make", "--weights", "w.pt", "--data", "data", "--batch-size", "4",
            "--strategies", "ema", "target", "--no-ci", "--no-progress", "--quiet", "--out", "rep"]
    with pytest.warns(UserWarning, match=r"source 'site_c' skipped: 1 sample\(s\) leave no calibration sample"):
        assert main(args) == 0, capsys.readouterr().err
    matrix = pd.read_csv(tmp_path / "rep" / "matrix.csv")
    assert sorted(set(matrix["eval_source"])) == ["site_a", "site_b"]
    assert "sources skipped: site_c (1 sample(s)" in (tmp_path / "rep" / "report.html").read_text()
    with pytest.warns(UserWarning, match="site_c"):
        assert main([*args[:-1], "rep3", "--held-out", "site_c", "site_b", "site_a"]) == 2
    assert "--held-out names every source" in capsys.readouterr().err


def test_the_report_computes_each_sources_statistics_once_for_the_shift_profile_and_target(tmp_path, monkeypatch):
    """The shift profile and ``target`` read the same calibration statistics: one pass for both (and one for
    ``precise``), and stats.json holds exactly what ``collect_stats`` gives on the calibration split."""
    import shiftbn as sb
    import shiftbn.evaluate.matrix as matrix_module
    import shiftbn.studies.report.build as build_module
    from shiftbn.bn.moments import SourceStats
    from shiftbn.evaluate import prepare
    from shiftbn.studies.models import MLP
    from shiftbn.studies.report import build_report

    ds = sb.load("blobs-labs", n=160, n_features=4)
    model = MLP(4, 3, hidden=8).eval()
    passes = []
    real = matrix_module.collect_stats

    def counted(*args, **kwargs):
        passes.append(kwargs.get("by_source", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(matrix_module, "collect_stats", counted)
    monkeypatch.setattr(build_module, "collect_stats", counted, raising=False)  # a pass of the report's own
    build_report(model, ds, tmp_path, strategies=["ema", "target", "precise"], ci=None, stats_batch_size=8,
                 progress=False)
    assert passes == [True, False]  # per source (shift profile and target), then precise's pooled pass
    written = SourceStats.from_dict(json.loads((tmp_path / "stats.json").read_text()))
    want = real(model, prepare(ds, ["ema"], calibration=0.5, seed=0).calibration, batch_size=8, progress=False)
    assert list(written) == list(want)
    for src in want:
        for layer, m in want[src].items():
            np.testing.assert_array_equal(written[src][layer].mean, m.mean)
            np.testing.assert_array_equal(written[src][layer].var, m.var)
