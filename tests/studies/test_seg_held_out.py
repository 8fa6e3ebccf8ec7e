"""The segmentation held-out-site protocol: tiny runs, seeded online streams, Tent carried case by case."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import shiftbn as sb
from shiftbn.adapt.tent import tent_online_logits
from shiftbn.studies import SegHeldOutSites, TrainConfig, make_study
from shiftbn.studies.caseintervals import case_intervals, paired_case_effects
from shiftbn.studies.segheldout import online_strategy, sequence_order
from shiftbn.studies.training import _soft_dice_loss, train

TINY = TrainConfig(model={"name": "UNet2d", "width": 2}, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    return sb.load("seg-sites-2d", n=5, size=16, sites=3)


def _study(**kw):
    args = dict(train=TINY, held_out=["site_c"], strategies=["ema", "target"], online=["tent", "batch"],
                streams=["site", "sequence"], orders=2, metrics=["dice", "hd95"])
    return SegHeldOutSites(**{**args, **kw})


def test_tiny_run_gives_one_row_per_case_strategy_and_metric(tiny):
    table = _study().run(tiny, progress=False)
    assert list(table.columns) == ["held_out", "eval_source", "is_held_out", "strategy", "mode", "stream", "metric",
                                   "case", "value", "value_sd", "groupings", "seconds", "seed"]
    cells = set(zip(table["mode"], table["stream"], table["strategy"], strict=True))
    assert cells == {("offline", "", "ema"), ("offline", "", "target"), ("online", "site", "tent"),
                     ("online", "sequence", "tent"), ("online", "case", "batch")}
    test_cases = len(tiny.split(fractions=TINY.fractions, seed=0).test)
    assert len(table) == len(cells) * test_cases * 2
    assert (table["is_held_out"] == (table["eval_source"] == "site_c")).all()
    assert table.groupby(["strategy", "stream"])["groupings"].first().to_dict() == {
        ("batch", "case"): 1, ("ema", ""): 1, ("target", ""): 1, ("tent", "sequence"): 2, ("tent", "site"): 2}
    dice = table.query("metric == 'dice'")["value"]
    assert dice.between(0, 1).all() and (table.query("metric == 'hd95'")["value"] >= 0).all()
    assert set(table["case"]) <= set(tiny.metadata["case"])


def test_same_seed_same_table(tiny):
    kw = dict(strategies=["ema"], online=["tent"], streams=["sequence"], metrics=["dice"])
    a = _study(**kw).run(tiny, progress=False).drop(columns="seconds")
    b = _study(**kw).run(tiny, progress=False).drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)


def test_sequence_order_is_seeded_and_keeps_sources_together():
    sizes = [3, 4, 5]
    a, again, other = (sequence_order(sizes, 1, s) for s in (0, 0, 1))
    flat = [int(c) for chunk in a for c in chunk]
    assert sorted(flat) == list(range(12)) and all(len(c) == 1 for c in a)
    assert flat == [int(c) for chunk in again for c in chunk]
    assert flat != [int(c) for chunk in other for c in chunk]
    source = np.repeat([0, 1, 2], sizes)[flat]
    assert (np.diff(source) != 0).sum() == 2  # each source's cases in one block


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))


def test_online_tent_batch_one_carries_adaptation_across_cases():
    x = torch.randn(6, 1, 8, 8) * 2 + 1
    carried = tent_online_logits(_conv(), x, batch_size=1, seed=0, lr=0.05)
    reset = tent_online_logits(_conv(), x, batch_size=1, seed=0, lr=0.05, episodic=True)
    chunks = [torch.tensor([i]) for i in np.random.default_rng(0).permutation(6)]
    first = int(chunks[0])
    assert torch.allclose(carried[first], reset[first])  # predicted before any update
    later = [int(c) for c in chunks[1:]]
    assert (carried[later] - reset[later]).abs().amax() > 1e-4
    again = tent_online_logits(_conv(), x, batch_size=1, seed=0, lr=0.05, chunks=chunks)
    assert torch.equal(again, carried)  # the default stream is the seeded shuffle
    reversed_ = tent_online_logits(_conv(), x, batch_size=1, seed=0, lr=0.05, chunks=chunks[::-1])
    assert (reversed_ - carried).abs().amax() > 1e-4  # the order of cases changes the outputs


def test_online_tent_refuses_bad_chunks_and_one_value_per_channel():
    with pytest.raises(ValueError, match="every position"):
        tent_online_logits(_conv(), torch.randn(3, 1, 4, 4), 1, 0, chunks=[torch.tensor([0]), torch.tensor([0])])
    mlp = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="one value per channel"):
        tent_online_logits(mlp, torch.randn(3, 4), 1, 0, all_bn=True)


def test_online_specs_and_bad_parameters():
    assert online_strategy("prior:16", "sequence", 3).name == "online[case]:prior:16"
    assert online_strategy("tent:all", "sequence", 3).all_bn
    with pytest.raises(ValueError, match="no case-by-case form"):
        online_strategy("target", "site", 1)
    with pytest.raises(ValueError, match="streams"):
        make_study("seg_held_out_sites", {"streams": ["sideways"]})
    with pytest.raises(ValueError, match="orders"):
        make_study("seg_held_out_sites", {"orders": 0})
    with pytest.raises(ValueError, match="do not fit"):
        make_study("seg_held_out_sites", {"metrics": ["accuracy"]})


def test_segmentation_training_loss_and_soft_dice(tiny):
    y = torch.randint(0, 3, (2, 8, 8))
    perfect = nn.functional.one_hot(y, 3).movedim(-1, 1).float() * 50
    assert float(_soft_dice_loss(perfect, y)) < 1e-6
    assert float(_soft_dice_loss(-perfect, y)) > 0.9
    net = sb.studies.models.unet2d(width=2)
    hist = train(net, tiny, steps=2, batch_size=4, progress=False)
    assert np.isfinite(hist["loss"]).all() and hist["accuracy"].between(0, 1).all()
    with pytest.raises(ValueError, match="dice_weight"):
        train(net, tiny, steps=1, batch_size=4, dice_weight=-1, progress=False)


def test_case_intervals_and_paired_effects():
    rows = pd.DataFrame({"seed": [0, 0, 0, 0, 1, 1, 1, 1], "case": [0, 1, 0, 1] * 2,
                         "strategy": ["a", "a", "b", "b"] * 2, "value": [0.9, 0.7, 0.6, 0.4, 0.8, 0.6, 0.5, 0.3]})
    cells = case_intervals(rows, ["strategy"], n_boot=500).set_index("strategy")
    assert cells.loc["a", "mean"] == pytest.approx(0.75) and cells.loc["a", "seeds"] == 2
    assert cells.loc["a", "low"] <= 0.75 <= cells.loc["a", "high"]
    eff = paired_case_effects(rows, [], "strategy", "a", "b", n_boot=500).iloc[0]
    assert eff["effect"] == pytest.approx(0.3) and eff["low"] == pytest.approx(0.3) and eff["supported"]
    with pytest.raises(ValueError, match="repeat"):
        paired_case_effects(pd.concat([rows, rows]), [], "strategy", "a", "b", n_boot=50)
