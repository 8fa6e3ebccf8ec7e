"""The batch-composition audit: leakage of label and site mix through per-batch statistics."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

import shiftbn as sb
from shiftbn.samplers import SourceBatchSampler
from shiftbn.sites.audit import _scores, audit_batches, audit_samplers, builtin_samplers
from shiftbn.studies.models import SmallCNN
from tests.helpers import assert_same_state, state_of


@pytest.fixture(scope="module")
def labs():
    return sb.load("digits-labs", size=8)


def _iid(n=1200, n_sites=4, seed=0):
    """Sites and labels drawn independently of the inputs: nothing to reveal."""
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(size=(n, 3)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 3, size=n))
    return sb.SourceTaggedDataset(TensorDataset(x, y), rng.integers(0, n_sites, size=n))


def test_single_site_sampler_leaks_the_site(labs):
    sampler = SourceBatchSampler(labs.source_ids, 32, "single", seed=0)
    audit = audit_batches(sampler, labs, epochs=2, n_permutations=10)
    t = audit.table.set_index(["target", "metric"])
    assert audit.leaks == {"label": False, "site": True}
    assert t.loc[("site", "sample_accuracy"), "low"] > 0.9 > 0.4 > t.loc[("site", "sample_accuracy"), "chance_high"]
    assert audit.statistics == "per-site" and "site LEAKS" in audit.verdict and "per-site" in audit.verdict
    assert list(audit.table.columns) == ["sampler", "target", "metric", "value", "low", "high", "chance",
                                         "chance_low", "chance_high", "ceiling", "beats_chance", "n_batches",
                                         "features"]
    assert t.loc[("site", "sample_accuracy"), "ceiling"] == 1.0  # single-site batches: the mix is the site
    assert sampler.epoch == 0  # put back after drawing epochs 0..1


def test_random_and_single_batches_of_iid_data_do_not_leak():
    ds = _iid()
    for mode, statistics in (("random", "pooled"), ("single", "per-site")):
        audit = audit_batches(SourceBatchSampler(ds.source_ids, 24, mode, seed=1), ds, epochs=2, n_permutations=10)
        assert audit.leaks == {"label": False, "site": False}, audit.table
        assert audit.statistics == statistics
        assert not audit.table["beats_chance"].any()


def test_recommendation_follows_the_batch_composition():
    ds = _iid(n=480)
    ids = ds.source_ids
    cases = {
        "random": (SourceBatchSampler(ids, 32, "random"), "pooled"),
        "single": (SourceBatchSampler(ids, 32, "single"), "per-site"),
        "mixed": (SourceBatchSampler(ids, 32, "mixed"), "pooled"),
        "mixed-2": (SourceBatchSampler(ids, 32, "mixed", sources_per_batch=2, balance="equal"), "mixed"),
        "mixed-1": (SourceBatchSampler(ids, 32, "mixed", sources_per_batch=1), "per-site"),
    }
    table, verdicts = audit_samplers(ds, {k: s for k, (s, _) in cases.items()}, epochs=2, n_permutations=5,
                                     n_boot=100)
    assert verdicts.set_index("sampler")["statistics"].to_dict() == {k: v for k, (_, v) in cases.items()}
    assert set(table["sampler"]) == set(cases) and len(table) == len(cases) * 4
    assert verdicts["verdict"].str.startswith(tuple(cases)).all()
    assert set(builtin_samplers(ds)) == {"random", "single", "mixed", "mixed-2"}


def test_scores_against_a_direct_computation():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=(30, 4)).astype(float)
    counts[:, 0] += 1
    pred = rng.random((30, 4))
    acc, r2 = _scores(pred, counts, np.arange(30)[None])
    y = counts / counts.sum(1, keepdims=True)
    hits = sum(counts[b, int(np.argmax(pred[b]))] for b in range(30))
    assert acc[0] == pytest.approx(hits / counts.sum(), abs=1e-12)
    ref_r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert r2[0] == pytest.approx(ref_r2, abs=1e-12)
    _, r2_const = _scores(pred, np.ones((30, 4)), np.arange(30)[None])
    assert np.isnan(r2_const[0])  # a mix that never varies has no R^2


def test_model_features_and_model_restored(labs):
    model = SmallCNN(width=4, seed=0).train()
    before = state_of(model)
    sampler = SourceBatchSampler(labs.source_ids, 32, "single", seed=0)
    audit = audit_batches(sampler, labs, model=model, epochs=1, n_permutations=5, n_boot=100)
    assert_same_state(model, before)
    assert (audit.table["features"] == "input+bn:features.1").all() and audit.leaks["site"]


def test_deterministic_given_seed():
    ds = _iid(n=480)
    sampler = SourceBatchSampler(ds.source_ids, 16, "single", seed=0)
    a, b, c = (audit_batches(sampler, ds, n_permutations=5, n_boot=100, seed=s) for s in (3, 3, 4))
    pd.testing.assert_frame_equal(a.table, b.table)
    assert not a.table.equals(c.table)


def test_bad_input(labs):
    sampler = SourceBatchSampler(labs.source_ids, 32, "single")
    with pytest.raises(TypeError, match="SourceTaggedDataset"):
        audit_batches(sampler, TensorDataset(torch.zeros(4, 2)))
    with pytest.raises(ValueError, match="too few for 5-fold"):
        audit_batches([[0, 1], [2, 3]], labs)
    with pytest.raises(ValueError, match="epochs must be"):
        audit_batches(sampler, labs, epochs=0)


@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_report_audit_marks_the_training_sampler(labs):
    from shiftbn.studies.report.decisions import audit_table

    table = audit_table(labs, 32, "single", seed=0)
    assert table.loc[table["trained_with"], "sampler"].tolist() == ["single"]
    by = table.set_index("sampler")
    assert by.loc["single", "statistics"] == "per-site" and by.loc["single", "site_leak"]
    assert by.loc["random", "statistics"] == "pooled" and not by.loc["random", "site_leak"]
    with pytest.raises(ValueError, match="'k-sources'"):
        audit_table(labs, 32, "k-sources")
