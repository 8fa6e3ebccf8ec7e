import copy

import numpy as np
import pytest
import torch

import shiftbn as sb
from shiftbn.adapt import Strategy, parse_strategy, register_strategy
from shiftbn.evaluate import cross_source_matrix
from shiftbn.studies.models import SmallCNN
from shiftbn.studies.training import train
from tests.helpers import assert_same_state, state_of

TRAIN = ["lab_a", "lab_b", "lab_c", "lab_d"]


@pytest.fixture(scope="module")
def trained():
    ds = sb.load("digits-labs")
    model = SmallCNN(width=8, seed=0)
    train(model, ds.subset(TRAIN), steps=250, batch_size=32, seed=0, progress=False)
    model.eval()
    return model, ds


def _acc(table, strategy, source):
    q = table.query("strategy == @strategy and eval_source == @source and metric == 'accuracy'")
    return q["value"].item()


def test_target_rescues_strongly_shifted_lab_and_prior_moves_toward_source(trained):
    model, ds = trained
    specs = ["ema", "target", "batch:64", "prior:0", "prior:16", "prior:1e9", "prior:1e9@all"]
    table = cross_source_matrix(model, ds, specs, ["accuracy"], train_sources=TRAIN, eval_sources=["lab_e"],
                                progress=False)
    assert _acc(table, "target", "lab_e") > _acc(table, "ema", "lab_e") + 0.2
    assert _acc(table, "prior:0", "lab_e") == _acc(table, "batch:64", "lab_e")  # same seeded groupings
    assert _acc(table, "prior:16", "lab_e") > _acc(table, "ema", "lab_e") + 0.2
    assert _acc(table, "prior:1e+09", "lab_e") == pytest.approx(_acc(table, "ema", "lab_e"), abs=0.01)
    assert _acc(table, "prior:1e+09@all", "lab_e") == pytest.approx(_acc(table, "ema", "lab_e"), abs=0.01)
    # the mixed statistics move monotonically from the target's toward the model's own
    stats = sb.collect_stats(model, ds.subset("lab_e"), progress=False)["lab_e"]
    ema = sb.bn.buffer_stats(model)
    dists = []
    for n in (0, 16, 1000, 1e9):
        mixed = sb.bn.mix_stats(ema, stats, n / (n + stats.num_samples))
        dists.append(sum(np.abs(mixed[k].mean - ema[k].mean).sum() for k in ema))
    assert dists == sorted(dists, reverse=True) and dists[-1] < 1e-3 * dists[0]


def test_target_matches_independent_adabn_reference(trained):
    model, ds = trained
    lab = ds.subset("lab_e")
    sp = lab.split(fractions=(0.0, 0.5, 0.5), seed=0)
    cal_x = torch.stack([sp.calibration[i][0] for i in range(len(sp.calibration))])
    test_x = torch.stack([sp.test[i][0] for i in range(len(sp.test))])
    # independent AdaBN: reset statistics, forward the target data in train mode, momentum None
    ref = copy.deepcopy(model)
    for layer in sb.bn_layers(ref):
        layer.module.reset_running_stats()
        layer.module.momentum = None
    ref.train()
    with torch.no_grad():
        ref(cal_x)
        ref.eval()
        ref_logits = ref(test_x)
    table = cross_source_matrix(model, lab, ["target"], ["accuracy"], calibration=(sp.calibration, sp.test),
                                stats_batch_size=len(cal_x), progress=False)
    assert table["n"].item() == len(test_x)
    ours = sb.collect_stats(model, sp.calibration, batch_size=len(cal_x), progress=False)["lab_e"]
    with sb.use_stats(model, ours), torch.no_grad():
        our_logits = model(test_x)
    torch.testing.assert_close(our_logits, ref_logits, rtol=1e-3, atol=1e-3)
    acc_ref = (ref_logits.argmax(1).numpy() == sp.test.labels).mean()
    assert table["value"].item() == pytest.approx(acc_ref)


def test_model_unchanged_after_every_strategy_and_the_matrix(trained):
    model, ds = trained
    model.train()  # a model left in train mode must stay so
    before = state_of(model)
    table = cross_source_matrix(
        model, ds, ["ema", "precise", "target", "prior:16", "batch:16", "batch:16:mixed:k=2", "per-source",
                    "tent-offline:3", "tent:k=2", "prior:16@20", "stats:*"], ["accuracy", "nll"], train_sources=TRAIN,
        progress=False)
    assert_same_state(model, before)
    model.eval()
    assert set(table.columns) == {"strategy", "is_cross_source", "stats_source", "eval_source", "metric", "value", "n",
                                  "groupings", "value_sd"}
    assert len(table) == (10 + 5) * 5 * 2
    groups = table.groupby("strategy")["groupings"].first().to_dict()
    assert groups["batch:16"] == groups["prior:16"] == 5 and groups["tent:k=2"] == 2
    assert groups["ema"] == groups["prior:16@20"] == groups["tent-offline:3"] == 1
    assert (table["value_sd"].isna() == (table["groupings"] == 1)).all()
    assert table["value"].between(0, np.inf).all()
    # logits are shared: target on j equals stats:j on j and per-source
    for s in ds.source_names:
        assert _acc(table, "target", s) == _acc(table, f"stats:{s}", s) == _acc(table, "per-source", s)
    off = table.query("strategy == 'stats:lab_e' and eval_source == 'lab_a' and metric == 'accuracy'")
    assert off["stats_source"].item() == "lab_e"


def test_batch_mixed_differs_from_single_source_batches(trained):
    model, ds = trained
    table = cross_source_matrix(model, ds, ["batch:32:k=2", "batch:32:mixed:k=2"], ["accuracy"], progress=False)
    assert _acc(table, "batch:32:k=2", "lab_e") > _acc(table, "batch:32:mixed:k=2", "lab_e") + 0.1
    some = cross_source_matrix(model, ds, ["batch:32:mixed:k=1"], ["accuracy"], eval_sources=["lab_a", "lab_e"],
                               progress=False)
    assert list(some["eval_source"]) == ["lab_a", "lab_e"]


def test_custom_strategy_registration(trained):
    model, ds = trained

    class Ema(Strategy):
        name = "my-ema"

        def stats_source(self, ctx, eval_source):
            return "ema"

        def bn_stats(self, ctx, eval_source):
            return None

    register_strategy("my-ema", lambda arg: Ema())
    table = cross_source_matrix(model, ds, ["ema", "my-ema"], ["accuracy"], progress=False)
    for s in ds.source_names:
        assert _acc(table, "ema", s) == _acc(table, "my-ema", s)


@pytest.mark.parametrize("spec, msg", [
    ("adabn", "unknown strategy"), ("prior:x", "needs a number"), ("batch", "batch size"), ("batch:0", "B >= 1"),
    ("batch:8:shuffled", "unknown batch option"), ("stats", "source name"), ("ema:3", "takes no argument"),
    ("prior:-1", "N >= 0"), ("tent:10", "tent-offline:10"), ("prior:16@x", "needs a number"),
    ("prior:16@0", ">= 1"), ("prior:16:8:4", "unknown prior options"), ("batch:8:k=0", "K >= 1"),
    ("batch:k=3", "batch size first"), ("prior:k=3", "strength N first"), ("tent-episodic:2", "tent-offline:2"),
    ("stats:ema", "strategy 'ema'"), ("stats:precise", "no source's"), ("stats:prior:16", "rename the source"),
])
def test_bad_strategy_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_strategy(spec)


def test_old_strategy_spelling_source_still_parses_to_ema_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'source' is now spelled 'ema'.*goes in the next release"):
        old = parse_strategy("source")
    assert isinstance(old, sb.adapt.EMA) and old.name == "ema"
    with pytest.raises(ValueError, match="'ema' takes no argument"):  # a refused spec: the error alone
        parse_strategy("source:3")
    with pytest.raises(ValueError, match="unknown strategy") as e:
        parse_strategy("sourc")
    assert "'source'" not in str(e.value) and "'ema'" in str(e.value)  # the old spelling is not advertised


def test_old_class_name_source_is_ema_with_a_warning():
    import shiftbn.adapt
    import shiftbn.adapt.strategies

    for module in (shiftbn.adapt, shiftbn.adapt.strategies):
        with pytest.warns(DeprecationWarning, match="Source is now EMA"):
            assert module.Source is sb.adapt.EMA
    with pytest.warns(DeprecationWarning, match=r"shiftbn.Source moved to shiftbn.adapt.EMA"):
        assert sb.Source is sb.adapt.EMA
    with pytest.raises(AttributeError):
        shiftbn.adapt.NoSuchStrategy  # noqa: B018
