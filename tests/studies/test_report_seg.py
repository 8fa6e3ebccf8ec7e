"""The segmentation report (``build_report`` on data whose targets are masks) and the decision table on a
metric other than accuracy."""

import json

import pandas as pd
import pytest
import torch

import shiftbn as sb
from shiftbn.studies.models import unet2d
from shiftbn.studies.report import build_report
from shiftbn.studies.report.recommend import _by_interval, decision_table
from shiftbn.studies.report.segmentation import SKIPPED_SENTENCE, case_table


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One 2-D report (two sites of four 16 x 16 cases), built through a user forward that counts its calls."""
    out = tmp_path_factory.mktemp("segreport")
    ds = sb.load("seg-sites-2d", n=4, size=16, sites=2)
    model = unet2d(width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def forward(m, x):
        calls.append(len(x))
        return m(x)

    page = build_report(model, ds, out, strategies=["ema", "target", "precise"], n_boot=10,
                        stats_batch_size=4, progress=False, forward=forward)
    return {"out": out, "page": page, "model": model, "before": before, "calls": calls}


def test_the_page_has_the_dice_matrix_distributions_overlays_and_decisions(report):
    html = report["page"].read_text()
    for heading in ("Decision per site", "Cross-source matrix (dice)", "Cross-source matrix (hd95)",
                    "Per-case distributions per site", "Prediction vs ground truth", "Dice by strategy and site",
                    "Paired differences to the stored statistics (ema)"):
        assert f"<h2>{heading}</h2>" in html, heading
    assert SKIPPED_SENTENCE in html
    assert "Calibration (ECE) per site" not in html and "Confusion per site" not in html
    assert "Sample images per site" not in html  # the overlays show the images
    figures = report["out"] / "figures"
    assert {p.name for p in figures.iterdir()} >= {"matrix.png", "matrix_hd95.png", "cases.png", "overlays.png"}


def test_the_matrix_is_per_case_dice_and_hd95_with_intervals_and_the_model_is_unchanged(report):
    matrix = pd.read_csv(report["out"] / "matrix.csv")
    assert set(matrix["metric"]) == {"dice", "hd95"}
    assert (matrix["n"] == 2).all() and matrix["ci_low"].notna().all()
    cases = pd.read_csv(report["out"] / "cases.csv")
    main = matrix[~matrix["is_cross_source"]]
    means = cases.groupby(["strategy", "eval_source", "metric"])["value"].mean()
    for r in main.itertuples():  # the matrix's cells are the means of the cases the distributions draw
        assert means[(r.strategy, r.eval_source, r.metric)] == pytest.approx(r.value, rel=1e-12, abs=1e-12)
    assert report["calls"], "the user's forward was not used"
    for k, v in report["model"].state_dict().items():
        assert torch.equal(v, report["before"][k]), k


def test_the_decision_rests_on_dice(report):
    decisions = json.loads((report["out"] / "report.json").read_text())["decisions"]
    assert [d["source"] for d in decisions] == ["site_a", "site_b"]
    for d in decisions:
        assert "Dice" in d["why"] and "cases" in d["why"]
        assert d["cost"].startswith(("none", "HD95"))


def test_unlabeled_sites_are_refused_for_segmentation(tmp_path):
    ds = sb.load("seg-sites-2d", n=2, size=8, sites=2)
    with pytest.raises(ValueError, match=r"--unlabeled\) \['site_b'\]: the label-free panel reads class predictions"):
        build_report(unet2d(width=2), ds, tmp_path, unlabeled=["site_b"], progress=False)


def _comparisons(metric):
    return pd.DataFrame({"eval_source": "s", "strategy": ["target", "precise"], "baseline": "ema", "metric": metric,
                         "diff": [-5.0, 3.0], "ci_low": [-6.0, 2.0], "ci_high": [-4.0, 4.0], "n": 10, "level": 0.95})


def test_a_lower_is_better_score_picks_the_strategy_that_lowers_it():
    strategy, why = _by_interval(_comparisons("hd95"), "s", 0.95, "hd95")
    assert strategy == "target"
    assert why.startswith("HD95 -5 [-6, -4] over the model's own statistics") and "worse beyond noise here: precise" \
        in why
    strategy, why = _by_interval(_comparisons("accuracy"), "s", 0.95)  # higher is better: the rise wins
    assert strategy == "precise" and why.startswith("accuracy +300.0 points")


def test_the_decision_table_scores_dice_and_costs_hd95():
    rows = {("ema", "s"): torch.tensor([[0.5, 0.5, 4.0, 4.0]] * 6).numpy(),
            ("target", "s"): torch.tensor([[0.9, 0.8, 1.0, 1.0]] * 6).numpy()}  # K = 2: dice, iou, hd95, asd
    comparisons = pd.DataFrame({"eval_source": "s", "strategy": ["target"], "baseline": "ema", "metric": "dice",
                                "diff": [0.4], "ci_low": [0.3], "ci_high": [0.5], "n": 6, "level": 0.95})
    t = decision_table(["s"], {"s": "all"}, comparisons=comparisons, outputs=rows, labels={"s": list(range(6))},
                       label_free={}, base="shiftbn recalibrate", n_boot=20, metrics=("dice", "hd95"))
    row = t.iloc[0]
    assert row["strategy"] == "target" and row["why"].startswith("Dice +40.0 points [+30.0, +50.0]")
    assert row["cost"].startswith("HD95 4 -> 1 (-3 [-3, -3]") and "need class predictions" in row["cost"]
    assert len(case_table(rows, ["dice"], ["ema", "target"])) == 12


def _seg_matrix(metric, values):
    return pd.DataFrame([{"strategy": st, "is_cross_source": False, "eval_source": src, "metric": metric,
                          "value": v, "n": 4, "ci_low": v - 0.01, "ci_high": v + 0.01}
                         for (st, src), v in values.items()])


def test_the_reading_says_dice_as_a_score_and_hd95_in_mm_lower_better():
    from shiftbn.studies.report import findings

    dice = _seg_matrix("dice", {("ema", "site_a"): 0.005, ("ema", "site_b"): 0.8, ("target", "site_a"): 0.3,
                                ("target", "site_b"): 0.8})
    pairs = pd.DataFrame([{"eval_source": "site_a", "strategy": "target", "baseline": "ema", "metric": "dice",
                           "diff": 0.295, "ci_low": 0.2, "ci_high": 0.4, "n": 4}])
    text = " ".join(findings(dice, metric="dice", comparisons=pairs, word="site"))
    assert "the worst site is site_a at Dice 0.005 (0 to 1, higher is better; 95% CI -0.005 to 0.015, n=4)" in text
    assert "0.5%" not in text and "% dice" not in text and "% hd95" not in text and "points" not in text, text
    assert "target's (+0.295 Dice, 95% paired interval +0.200 to +0.400)" in text, text
    hd = _seg_matrix("hd95", {("ema", "site_a"): 2.0, ("ema", "site_b"): 9.5, ("target", "site_a"): 2.0,
                              ("target", "site_b"): 4.0})
    pairs = pd.DataFrame([{"eval_source": "site_b", "strategy": "target", "baseline": "ema", "metric": "hd95",
                           "diff": -5.5, "ci_low": -7.0, "ci_high": -4.0, "n": 4}])
    text = " ".join(findings(hd, metric="hd95", comparisons=pairs, word="site"))
    assert "the worst site is site_b at HD95 9.50 mm (lower is better; 95% CI 9.49 to 9.51 mm, n=4)" in text, text
    assert "against 2.00 mm on average elsewhere" in text, text
    assert "the largest gain over the stored statistics (ema) is target's (-5.50 mm, 95% paired interval -7.00 " \
           "to -4.00 mm)" in text, text
    assert "0.5%" not in text and "% dice" not in text and "% hd95" not in text and "points" not in text, text


def test_every_forward_of_the_report_takes_at_most_the_evaluation_batch(tmp_path):
    """At ``batch_size=1`` (``--eval-batch-size 1``, for volumes that fit one at a time) no forward of the
    report, the overlays' included, stacks two cases."""
    ds = sb.load("seg-sites-2d", n=4, size=16, sites=2)
    model = unet2d(width=4).eval()
    calls = []

    def forward(m, x):
        calls.append(len(x))
        return m(x)

    build_report(model, ds, tmp_path, strategies=["ema", "target"], ci=None, batch_size=1, stats_batch_size=1,
                 progress=False, forward=forward)
    assert calls and set(calls) == {1}, sorted(set(calls))
