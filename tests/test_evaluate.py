import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from torch import nn

import shiftbn as sb
from shiftbn.data import ArrayDataset
from shiftbn.evaluate import cross_source_matrix, evaluate, metric_value, summarize


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
        metric_value("mae", np.zeros((3, 2)), np.zeros(3))
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
        cross_source_matrix(model, ds, ["source"], ["accurate"], progress=False)
    with pytest.raises(ValueError, match="calibration must be"):
        cross_source_matrix(model, ds, ["source"], calibration=1.5, progress=False)
    tiny = ds.take(np.r_[np.flatnonzero(ds.source_ids == 0), np.flatnonzero(ds.source_ids == 1)[:1]])
    with pytest.raises(ValueError, match="no calibration samples.*transductive"):
        cross_source_matrix(model, tiny, ["target"], calibration=0.3, progress=False)
    shifted = sb.SourceTaggedDataset(ArrayDataset(ds.base.x, ds.labels + 2), ds.source_ids, ds.labels + 2,
                                     source_names=ds.source_names)
    with pytest.raises(ValueError, match="model has 3 outputs"):
        cross_source_matrix(model, shifted, ["source"], progress=False)
    with pytest.raises(ValueError, match="unknown source"):
        cross_source_matrix(model, ds, ["source"], eval_sources=["lab_9"], progress=False)


def test_transductive_ci_evaluate_and_summary():
    ds, model = _blobs_model()
    table = cross_source_matrix(model, ds, ["source", "target"], ["accuracy"], transductive=True, ci=0.9,
                                n_boot=50, progress=False)
    assert (table["n"] == ds.counts().groupby("source")["n"].sum().values.repeat(1).tolist() * 2).all()
    assert ((table["ci_low"] <= table["value"]) & (table["value"] <= table["ci_high"])).all()
    one = evaluate(model, ds, "target", ["accuracy", "nll"], progress=False)
    assert set(one["strategy"]) == {"target"} and len(one) == 8
    fake = pd.DataFrame({"strategy": "s", "metric": ["accuracy"] * 3 + ["nll"] * 3,
                         "eval_source": list("abc") * 2, "value": [0.9, 0.5, 0.7, 0.2, 1.5, 0.4]})
    summary = summarize(fake).set_index("metric")
    assert summary.loc["accuracy", "worst_source"] == "b" and summary.loc["accuracy", "gap"] == pytest.approx(0.4)
    assert summary.loc["nll", "worst_source"] == "b" and summary.loc["nll", "best_source"] == "a"
    assert summary.loc["accuracy", "mean"] == pytest.approx(0.7)


def test_two_threads_running_the_matrix_on_one_model_get_serial_results():
    import threading

    from shiftbn.models import MLP
    from tests.helpers import assert_same_state, state_of

    ds = sb.load("blobs-labs", n=160)
    model = MLP(16, 3, hidden=16)
    sb.train(model, ds, steps=5, batch_size=16, progress=False)
    model.eval()
    strategies = ["source", "target", "batch:8", "tent:2"]
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
    from shiftbn.models import MLP

    ds = sb.load("blobs-labs", n=120)
    model = MLP(16, 3, hidden=8).eval()
    seen = []
    hook = model.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled("cpu")))
    cross_source_matrix(model, ds, ["source", "target", "batch:8"], amp=True, progress=False)
    hook.remove()
    assert seen and all(seen)
    with pytest.raises(ValueError, match="model is on cpu"):
        cross_source_matrix(model, ds, ["source"], device="meta", progress=False)
