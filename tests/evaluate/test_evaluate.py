import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from torch import nn

import shiftbn as sb
from shiftbn.data import ArrayDataset
from shiftbn.evaluate import cross_source_matrix, metric_value, summarize


def _numpy_ece(p, y, bins=15):
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


def test_classification_metrics_against_references():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 2
    y = rng.integers(0, 3, size=200)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metric_value("accuracy", logits, y) == accuracy_score(y, logits.argmax(1))
    assert metric_value("nll", logits, y) == pytest.approx(log_loss(y, p), rel=1e-9)
    assert metric_value("auroc", logits, y) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), rel=1e-9)
    assert metric_value("ece", logits, y) == pytest.approx(_numpy_ece(p, y), abs=1e-5)
    assert 0 <= metric_value("balanced_accuracy", logits, y) <= 1
    assert 0 <= metric_value("macro_f1", logits, y) <= 1
    binary = rng.normal(size=(50, 2))
    yb = rng.integers(0, 2, size=50)
    pb = torch.softmax(torch.tensor(binary), 1).numpy()[:, 1]
    assert metric_value("auroc", binary, yb) == pytest.approx(roc_auc_score(yb, pb))


def test_regression_metrics_and_task_mismatch():
    y = np.array([1.0, 2.0, 3.0])
    assert metric_value("mae", np.array([[1.5], [2.0], [2.0]]), y) == pytest.approx(0.5)
    assert metric_value("r2", y.copy(), y) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs class logits"):
        metric_value("accuracy", y, y)
    with pytest.raises(ValueError, match="is for regression"):
        metric_value("mae", np.zeros((3, 3)), np.zeros(3))  # (N, 2) is (mean, sd) for a regression metric
    with pytest.raises(ValueError, match="model has 2 outputs"):
        metric_value("accuracy", np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="unknown metric"):
        metric_value("f2", np.zeros((3, 2)), np.zeros(3))


def _blobs_model():
    ds = sb.load("blobs-labs", n=400)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return ds, model


def test_bad_inputs_name_the_fix():
    ds, model = _blobs_model()
    with pytest.raises(ValueError, match="unknown strategy"):
        cross_source_matrix(model, ds, ["adabn"], progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        cross_source_matrix(model, ds, ["ema"], ["accurate"], progress=False)
    with pytest.raises(ValueError, match="calibration must be"):
        cross_source_matrix(model, ds, ["ema"], calibration=1.5, progress=False)
    tiny = ds.take(np.r_[np.flatnonzero(ds.source_ids == 0), np.flatnonzero(ds.source_ids == 1)[:1]])
    with pytest.raises(ValueError, match="no calibration samples.*transductive"):
        cross_source_matrix(model, tiny, ["target"], calibration=0.3, progress=False)
    shifted = sb.SourceTaggedDataset(ArrayDataset(ds.base.x, ds.labels + 2), ds.source_ids, ds.labels + 2,
                                     source_names=ds.source_names)
    with pytest.raises(ValueError, match="model has 3 outputs"):
        cross_source_matrix(model, shifted, ["ema"], progress=False)
    with pytest.raises(ValueError, match="unknown source"):
        cross_source_matrix(model, ds, ["ema"], eval_sources=["lab_9"], progress=False)


def test_transductive_ci_one_strategy_and_summary():
    ds, model = _blobs_model()
    table = cross_source_matrix(model, ds, ["ema", "target"], ["accuracy"], transductive=True, ci=0.9,
                                n_boot=50, progress=False)
    assert (table["n"] == ds.counts().groupby("source")["n"].sum().values.repeat(1).tolist() * 2).all()
    assert ((table["ci_low"] <= table["value"]) & (table["value"] <= table["ci_high"])).all()
    one = cross_source_matrix(model, ds, ["target"], ["accuracy", "nll"], progress=False)
    assert set(one["strategy"]) == {"target"} and len(one) == 8
    fake = pd.DataFrame({"strategy": "s", "metric": ["accuracy"] * 3 + ["nll"] * 3,
                         "eval_source": list("abc") * 2, "value": [0.9, 0.5, 0.7, 0.2, 1.5, 0.4]})
    summary = summarize(fake).set_index("metric")
    assert summary.loc["accuracy", "worst_source"] == "b" and summary.loc["accuracy", "gap"] == pytest.approx(0.4)
    assert summary.loc["nll", "worst_source"] == "b" and summary.loc["nll", "best_source"] == "a"
    assert summary.loc["accuracy", "mean"] == pytest.approx(0.7)


def test_two_threads_running_the_matrix_on_one_model_get_serial_results():
    import threading

    from shiftbn.studies.models import MLP
    from tests.helpers import assert_same_state, state_of

    ds = sb.load("blobs-labs", n=160)
    model = MLP(16, 3, hidden=16)
    sb.studies.train(model, ds, steps=5, batch_size=16, progress=False)
    model.eval()
    strategies = ["ema", "target", "batch:8", "tent-offline:2"]
    serial = cross_source_matrix(model, ds, strategies, progress=False)
    before = state_of(model)
    results, errors = [], []

    def work():
        try:
            results.extend(cross_source_matrix(model, ds, strategies, progress=False) for _ in range(3))
        except Exception as exc:  # a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 6, errors
    for table in results:
        pd.testing.assert_frame_equal(table, serial)
    assert_same_state(model, before)


def test_amp_reaches_every_forward_of_the_matrix():
    from shiftbn.studies.models import MLP

    ds = sb.load("blobs-labs", n=120)
    model = MLP(16, 3, hidden=8).eval()
    seen = []
    hook = model.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled("cpu")))
    cross_source_matrix(model, ds, ["ema", "target", "batch:8"], amp=True, progress=False)
    hook.remove()
    assert seen and all(seen)
    with pytest.raises(ValueError, match="model is on cpu"):
        cross_source_matrix(model, ds, ["ema"], device="meta", progress=False)
def test_paired_difference_matches_a_hand_computation():
    from shiftbn.evaluate import paired_difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=40)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    diff, low, high = paired_difference(a, b, y, "accuracy", n_boot=200, level=0.9, seed=7)
    # by hand: the documented draw, both strategies scored on the same resampled indices, percentiles
    idx = np.random.default_rng(7).integers(0, 40, size=(200, 40))
    ca, cb = a.argmax(1) == y, b.argmax(1) == y
    reps = np.array([ca[i].mean() - cb[i].mean() for i in idx])
    assert diff == pytest.approx(ca.mean() - cb.mean(), abs=1e-12)
    assert low == pytest.approx(np.quantile(reps, 0.05), abs=1e-12)
    assert high == pytest.approx(np.quantile(reps, 0.95), abs=1e-12)
    # a metric without a vectorized path goes through metric_value on each resample: same rule
    d2 = paired_difference(a, b, y, "macro_f1", n_boot=30, level=0.9, seed=1)
    idx = np.random.default_rng(1).integers(0, 40, size=(30, 40))
    reps = [metric_value("macro_f1", a[i], y[i]) - metric_value("macro_f1", b[i], y[i]) for i in idx]
    assert (d2.low, d2.high) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])), abs=1e-12)
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, b[:10], y, "accuracy")
    with pytest.raises(ValueError, match="level"):
        paired_difference(a, b, y, "accuracy", level=95)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_outputs():
    from shiftbn.evaluate import bootstrap_interval, paired_difference

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 4, size=n)
    shared = rng.normal(size=(n, 4))
    shared[np.arange(n), y] += 0.8  # both strategies share most of their errors
    a = shared + 0.15 * rng.normal(size=(n, 4))
    b = shared + 0.15 * rng.normal(size=(n, 4))
    paired = paired_difference(a, b, y, "accuracy", n_boot=1000, seed=0)
    # unpaired: independent resamples of each strategy (different seeds), the interval of the difference
    idx_a = np.random.default_rng(1).integers(0, n, size=(1000, n))
    idx_b = np.random.default_rng(2).integers(0, n, size=(1000, n))
    reps = (a.argmax(1) == y)[idx_a].mean(1) - (b.argmax(1) == y)[idx_b].mean(1)
    unpaired_low, unpaired_high = np.quantile(reps, [0.025, 0.975])
    assert (paired.high - paired.low) < 0.5 * (unpaired_high - unpaired_low)
    assert paired.low <= paired.value <= paired.high
    # each strategy's own interval is as wide as the unpaired one suggests
    one = bootstrap_interval(a, y, "accuracy", n_boot=1000, seed=0)
    assert one.high - one.low > 2 * (paired.high - paired.low)


def test_stratified_resampling_keeps_every_source_its_size():
    from shiftbn.evaluate import bootstrap_interval, resample_indices

    strata = np.array([0] * 5 + [1] * 95)
    idx = resample_indices(100, 50, seed=0, strata=strata)
    assert idx.shape == (50, 100)
    assert ((strata[idx] == 0).sum(1) == 5).all()  # never a resample without the small source
    y = np.r_[np.zeros(5, int), np.ones(95, int)]
    out = np.zeros((100, 2))
    out[:, 1] = 1.0  # right on source 1, wrong on source 0: pooled accuracy is exactly 0.95 in every resample
    iv = bootstrap_interval(out, y, "accuracy", n_boot=200, strata=strata)
    assert iv.value == iv.low == iv.high == pytest.approx(0.95)
    with pytest.raises(ValueError, match="one stratum per sample"):
        resample_indices(100, 10, strata=strata[:50])


def test_matrix_intervals_resample_within_each_eval_source():
    from shiftbn.evaluate import bootstrap_interval, collect, prepare, score

    ds, model = _blobs_model()
    plan = prepare(ds, ["ema", "target"], transductive=True)
    ctx, labels = collect(model, plan, progress=False)
    kept = {}
    table = score(ctx, plan, labels, ["accuracy", "ece"], ci=0.95, n_boot=100, progress=False, keep_outputs=kept)
    for row in table.itertuples():
        out, y = kept[(row.strategy, row.eval_source)], labels[row.eval_source]
        assert row.n == len(y) == (ds.source_ids == ds.source_id(row.eval_source)).sum()
        iv = bootstrap_interval(out, y, row.metric, n_boot=100, level=0.95, seed=0)
        assert (row.ci_low, row.ci_high) == pytest.approx((iv.low, iv.high))
    first = ds.sources_present[0]
    ece_reps = bootstrap_interval(kept[("ema", first)], labels[first], "ece", n_boot=20, seed=0)
    idx = np.random.default_rng(0).integers(0, len(labels[first]), size=(20, len(labels[first])))
    by_hand = [metric_value("ece", kept[("ema", first)][i], labels[first][i]) for i in idx]
    assert (ece_reps.low, ece_reps.high) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])), abs=1e-5)


def test_sources_named_like_statistics_labels_are_refused():
    from shiftbn.studies.models import MLP

    base = sb.load("blobs-labs", n=160)
    names = np.where(base.source_ids == 0, "ema", np.where(base.source_ids == 1, "precise", "c"))
    ds = sb.SourceTaggedDataset(base.base, names, base.labels)
    model = MLP(16, 3, hidden=8).eval()
    with pytest.raises(ValueError, match="'ema' labels statistics that are no source's.*rename the source"):
        cross_source_matrix(model, ds, ["ema", "precise"], ["nll"], progress=False)
    with pytest.raises(ValueError, match="'precise' labels statistics"):
        sb.parse_strategy("stats:precise")


def test_a_given_calibration_set_is_checked_by_source_name():
    from shiftbn.studies.models import MLP

    ds = sb.load("blobs-labs", n=160)
    model = MLP(16, 3, hidden=8).eval()
    sp = ds.split(fractions=(0.0, 0.5, 0.5), seed=0)
    cal = sp.calibration.subset("lab_1")
    table = cross_source_matrix(model, ds, ["target"], calibration=(cal, sp.test), eval_sources=["lab_1"],
                                progress=False)
    assert list(table["eval_source"]) == ["lab_1"]
    with pytest.raises(ValueError, match=r"\['lab_0'\] have no calibration samples"):
        cross_source_matrix(model, ds, ["target"], calibration=(cal, sp.test), eval_sources=["lab_0"], progress=False)


def test_accuracy_equals_sklearn_bit_for_bit():
    # accuracy is computed without sklearn (its import costs seconds of every matrix's start-up)
    from sklearn.metrics import accuracy_score

    from shiftbn.evaluate.metrics import metric_value

    rng = np.random.default_rng(0)
    for n, k in [(1, 2), (7, 3), (1000, 10), (999, 2), (12345, 5)]:
        out, y = rng.normal(size=(n, k)), rng.integers(0, k, n)
        assert metric_value("accuracy", out, y) == float(accuracy_score(y, out.argmax(1)))
