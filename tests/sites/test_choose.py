"""choose_strategy, the ATC predictor and the strategy-choice summary."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import entropy

import shiftbn as sb
from shiftbn.evaluate import cross_source_matrix
from shiftbn.sites.atc import confidence_scores, fit_atc
from shiftbn.studies import choice_picks, choice_summary
from shiftbn.studies.base import TrainConfig
from shiftbn.studies.common import fit
from tests.helpers import assert_same_state, state_of


def test_confidence_scores_match_scipy_and_softmax():
    z = np.random.default_rng(0).normal(size=(50, 4)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(confidence_scores(z, "confidence"), p.max(1), rtol=1e-12)
    np.testing.assert_allclose(confidence_scores(z, "neg_entropy"), -entropy(p, axis=1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unknown confidence score"):
        confidence_scores(z, "margin")


@pytest.mark.parametrize("score", ["confidence", "neg_entropy"])
def test_atc_threshold_reproduces_the_fitted_accuracy(score):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 5)) * 2
    y = np.where(rng.random(400) < 0.6, z.argmax(1), rng.integers(0, 5, 400))
    atc = fit_atc(z, y, score)
    acc = np.mean(z.argmax(1) == y)
    assert atc.accuracy == pytest.approx(acc)
    assert abs(atc.predict(z) - acc) <= 1 / 400
    # more confident outputs (scaled logits) are predicted more accurate; flat ones less
    assert atc.predict(z * 3) > acc > atc.predict(z / 3)


@pytest.fixture(scope="module")
def blobs_case():
    ds = sb.load("blobs-labs", n=600, n_labs=4, seed=0)
    sp = ds.split(fractions=(0.5, 0.25, 0.25), seed=0)
    rest = ["lab_0", "lab_1", "lab_2"]
    torch.manual_seed(0)
    model = fit(TrainConfig(model={"name": "MLP", "hidden": 16}, steps=80, batch_size=32), sp.train.subset(rest), 0)
    return ds, sp, model


def test_choose_ranks_every_candidate_without_the_sites_labels(blobs_case):
    ds, sp, model = blobs_case
    before = state_of(model)
    kept: dict = {}
    cal = (sp.calibration, sp.test)
    table = sb.sites.choose_strategy(model, ds, "lab_3", ["ema", "target", "prior:16"], calibration=cal,
                               keep_outputs=kept)
    assert_same_state(model, before)
    assert list(table["strategy"]) == ["ema", "target", "prior:16"]
    assert sorted(table["rank"]) == [1, 2, 3] and table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "rank"].item() == 1
    assert table["pred_accuracy"].between(0, 1).all()
    assert table.set_index("strategy").loc["target", "bn_distance"] == 0.0
    # the site's labels are never read: scrambling them changes nothing
    scrambled = [part.take(np.arange(len(part))) for part in cal]
    for part in scrambled:
        part.labels = part.labels.copy()
        site = part.source_ids == part.source_id("lab_3")
        part.labels[site] = np.random.default_rng(0).integers(0, 3, site.sum())
    again = sb.sites.choose_strategy(model, ds, "lab_3", ["ema", "target", "prior:16"], calibration=tuple(scrambled))
    pd.testing.assert_frame_equal(table, again)
    # kept outputs are the matrix's: their accuracy equals cross_source_matrix's on the same split
    m = cross_source_matrix(model, ds, ["ema", "target"], calibration=cal, eval_sources=["lab_3"],
                            train_sources=["lab_0", "lab_1", "lab_2"], progress=False).set_index("strategy")["value"]
    y = sp.test.subset("lab_3").labels
    for name in ("ema", "target"):
        assert np.mean(kept[name, "lab_3"].argmax(1) == y) == pytest.approx(m[name])


def test_source_distance_matches_an_independent_w2(blobs_case):
    ds, sp, model = blobs_case
    table = sb.sites.choose_strategy(model, ds, "lab_3", ["ema"], calibration=(sp.calibration, sp.test))
    own = sb.collect_stats(model, sp.calibration.subset("lab_3"), progress=False)["lab_3"]
    ema = sb.buffer_stats(model)
    dists = []
    for name, mom in own.layers.items():
        ma, va = ema[name].mean, ema[name].var + 1e-5
        mb, vb = mom.mean, mom.var + 1e-5
        dists.append(np.mean(np.sqrt((ma - mb) ** 2 + (np.sqrt(va) - np.sqrt(vb)) ** 2)))
    assert table["bn_distance"].item() == pytest.approx(np.mean(dists), rel=1e-9)
    assert table["bn_distance_max"].item() == pytest.approx(max(dists), rel=1e-9)


def test_choose_refuses_bad_sites(blobs_case):
    ds, sp, model = blobs_case
    with pytest.raises(ValueError, match="unknown source"):
        sb.sites.choose_strategy(model, ds, "lab_9", ["ema"])
    with pytest.raises(ValueError, match="also in labeled"):
        sb.sites.choose_strategy(model, ds, "lab_3", ["ema"], labeled=["lab_3", "lab_0"])
    with pytest.raises(ValueError, match="range_factor"):
        sb.sites.choose_strategy(model, ds, "lab_3", ["ema"], range_factor=0)


def test_chooser_avoids_source_statistics_on_the_far_shifted_lab():
    ds = sb.load("digits-labs")
    sp = ds.split(fractions=(0.6, 0.2, 0.2), seed=0)
    rest = [s for s in ds.sources_present if s != "lab_e"]
    model = fit(TrainConfig(model={"name": "SmallCNN", "width": 8}, steps=100), sp.train.subset(rest), 0)
    t = sb.sites.choose_strategy(model, ds, "lab_e", ["ema", "target"], calibration=(sp.calibration, sp.test))
    t = t.set_index("strategy")
    assert not t.loc["ema", "in_range"] and t.loc["target", "chosen"]
    # ATC alone would have picked the collapsed, confidently wrong source statistics
    assert t.loc["ema", "pred_accuracy"] > t.loc["target", "pred_accuracy"]


def _choice_rows():
    rows = []
    for seed, lab, vals, chosen, pred in [(0, "a", [0.5, 0.9], 1, [0.6, 0.8]), (0, "b", [0.7, 0.6], 1, [0.9, 0.7]),
                                          (1, "a", [0.4, 0.8], 0, [0.5, 0.5])]:
        for i, s in enumerate(["ema", "target"]):
            rows.append({"seed": seed, "held_out": lab, "strategy": s, "value": vals[i], "chosen": i == chosen,
                         "pred_accuracy": pred[i], "confidence": pred[i]})
    return pd.DataFrame(rows)


def test_choice_summary_regret_and_hits_by_hand():
    s = choice_summary(_choice_rows()).set_index("policy")
    assert s.loc["chooser", "regret_mean"] == pytest.approx(100 * (0 + 0.1 + 0.4) / 3)
    assert s.loc["chooser", "hit_rate"] == pytest.approx(1 / 3)
    assert s.loc["always target", "regret_mean"] == pytest.approx(100 * 0.1 / 3)
    assert s.loc["always ema", "regret_max"] == pytest.approx(40)
    assert s.loc["oracle", "regret_mean"] == 0
    # per-seed means 5 and 40 points: their sd
    assert s.loc["chooser", "regret_sd"] == pytest.approx(np.std([5.0, 40.0], ddof=1))
    assert s.loc["chooser", "mae"] == pytest.approx(100 * np.mean([0.1, 0.1, 0.2, 0.1, 0.1, 0.3]))


def test_choice_picks_by_hand_and_consistent_with_the_summary():
    picks = choice_picks(_choice_rows()).set_index(["policy", "seed", "held_out"])
    # seed 1, lab a: the chooser took ema (0.4) where target reached 0.8
    row = picks.loc[("chooser", 1, "a")]
    assert (row["strategy"], row["value"], row["regret"], row["hit"]) == ("ema", 0.4, pytest.approx(40), False)
    assert picks.loc[("oracle", 0, "b"), "strategy"] == "ema"
    assert len(picks) == 3 * 6  # 3 cells x (chooser, atc only, max confidence, always ema, always target, oracle)
    summary = choice_summary(_choice_rows()).set_index("policy")
    means = picks.groupby("policy")["regret"].mean()
    assert np.allclose(means.reindex(summary.index), summary["regret_mean"])
