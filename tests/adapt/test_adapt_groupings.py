"""Grouping-dependent strategies are scored over seeded groupings; sources and statistics labels never collide."""

import numpy as np
import pytest
import torch

import shiftbn as sb
from shiftbn._names import STATS_LABELS
from shiftbn._torch import stack_inputs
from shiftbn.adapt import grouping_seed
from shiftbn.bn.batchstats import batch_stats_logits
from shiftbn.evaluate import cross_source_matrix
from shiftbn.evaluate.metrics import metric_value
from shiftbn.studies.models import MLP


@pytest.fixture(scope="module")
def blobs():
    ds = sb.load("blobs-labs", n=120)
    model = MLP(16, 3, hidden=16)
    sb.studies.train(model, ds, steps=5, batch_size=16, progress=False)
    return model.eval(), ds


def test_batch_value_is_the_mean_over_seeded_groupings(blobs):
    model, ds = blobs
    evals = list(ds.source_names[:2])
    table = cross_source_matrix(model, ds, ["batch:8:k=3", "batch:8:k=1", "ema"], ["accuracy"],
                                transductive=True, eval_sources=evals, seed=7, progress=False)
    for src in evals:
        part = ds.subset(src)
        x, y = stack_inputs(part), part.labels
        values = [metric_value("accuracy", batch_stats_logits(model, x, 8, grouping_seed(7, k)).numpy(), y)
                  for k in range(3)]
        row = table.query("strategy == 'batch:8:k=3' and eval_source == @src").iloc[0]
        assert row["groupings"] == 3
        assert row["value"] == pytest.approx(np.mean(values))
        assert row["value_sd"] == pytest.approx(np.std(values, ddof=1))
        one = table.query("strategy == 'batch:8:k=1' and eval_source == @src").iloc[0]
        assert one["value"] == pytest.approx(values[0]) and np.isnan(one["value_sd"])  # grouping 0 = the seed's
    assert (table.query("strategy == 'batch:8:k=3'")["value_sd"] > 0).any()  # groupings do move the result
    assert len({grouping_seed(7, k) for k in range(5)} | {grouping_seed(8, 0)}) == 6


def test_sources_and_statistics_labels_never_share_a_namespace(blobs):
    model, ds = blobs
    table = cross_source_matrix(model, ds, ["ema", "precise", "batch:8:k=1", "batch:8:mixed:k=1", "prior:4:k=1",
                                            "stats:*"], ["accuracy"], progress=False)
    own = set(table.loc[~table["strategy"].str.startswith("stats:"), "stats_source"])
    assert own == {"ema", "precise", "batch", "mixed-batch", "prior:4:k=1"} and not own & set(ds.source_names)
    with pytest.raises(ValueError, match="strategy 'ema'.*rename the source"):
        sb.parse_strategy("stats:ema")  # never the model's EMA, never a source: refused
    for bad in (*STATS_LABELS, "prior:16"):
        renamed = sb.SourceTaggedDataset(torch.utils.data.TensorDataset(torch.randn(8, 16), torch.zeros(8).long()),
                                         [0] * 4 + [1] * 4, source_names=[bad, "lab_x"])
        with pytest.raises(ValueError, match=f"cross_source_matrix: '{bad}' labels statistics.*rename the source"):
            cross_source_matrix(model, renamed, ["ema"], progress=False)
