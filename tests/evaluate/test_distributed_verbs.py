"""Every verb on 2 gloo ranks equals one process on the same data (statistics to 1e-10, tables identical)."""

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import shiftbn as sb
from tests.distributed_helpers import (
    assert_same_table,
    assert_stats_close,
    outcome,
    run_ranks,
    tiny_data,
    tiny_model,
)
from tests.evaluate.test_evaluate_tapped import items_only

STRATEGIES = ["ema", "precise", "target", "prior:4", "stats:*", "per-source", "batch:4", "batch:4:mixed",
              "tent-offline:2", "tent", "prior:4@all", "prior:2:8"]
MATRIX = {"strategies": STRATEGIES, "metrics": ["accuracy", "nll"], "batch_size": 5, "stats_batch_size": 6,
          "ci": 0.9, "n_boot": 20, "progress": False}


def _loader(rank, world):
    """A user's DDP loader: a DistributedSampler shards 66 samples unevenly into batches of 6."""
    sampler = DistributedSampler(tiny_data(), num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=False)
    return DataLoader(tiny_data(), batch_size=6, sampler=sampler)


def _verbs(rank, world, out_dir):
    ds = tiny_data()
    res = {}
    res["stats"] = outcome(lambda: sb.collect_stats(tiny_model(), ds, batch_size=8, progress=False).to_dict())
    res["sequential"] = outcome(lambda: sb.collect_stats(tiny_model(), ds, batch_size=8, mode="sequential",
                                                         progress=False).to_dict())
    # batches of 16: lab_c is one batch, held by rank 1 alone (absent on rank 0)
    res["absent"] = outcome(lambda: sb.collect_stats(tiny_model(), ds, batch_size=16, progress=False).to_dict())
    res["capped"] = outcome(lambda: sb.collect_stats(tiny_model(), ds, batch_size=4, num_samples=13,
                                                     progress=False).to_dict())
    # 6 samples in one batch: rank 1 gets no data at all and still takes part
    res["one_batch"] = outcome(lambda: sb.collect_stats(tiny_model(), ds.subset("lab_c").take(range(6)),
                                                        batch_size=8, progress=False).to_dict())
    ddp = DistributedDataParallel(tiny_model())
    res["precise_ddp"] = outcome(lambda: sb.precise_bn(ddp.module, _loader(rank, world), num_samples=None,
                                                       progress=False).to_dict())
    res["precise_buffers"] = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    res["matrix"] = outcome(lambda: sb.cross_source_matrix(tiny_model(), ds, **MATRIX))
    res["evaluate"] = outcome(lambda: sb.cross_source_matrix(tiny_model(), ds, ["target"], progress=False))
    model = tiny_model()
    res["recal_target"] = outcome(lambda: sb.sites.recalibrate(model, ds, target="lab_b", batch_size=4,
                                                         progress=False).to_dict())
    res["recal_precise"] = outcome(lambda: sb.sites.recalibrate(model, ds, method="precise", batch_size=8,
                                                          progress=False).to_dict())
    res["recal_buffers"] = {k: v.clone() for k, v in model.state_dict().items()}
    tapped = {"strategies": ["ema", "batch:4", "tent-offline:1"], "transductive": True, "batch_size": 5,
              "progress": False}
    res["tapped"] = outcome(lambda: sb.cross_source_matrix(tiny_model(), items_only(ds), **tapped))
    bad = tiny_data()
    bad.base.tensors[0][-1, 0, 0, 0] = float("nan")  # the last sample of lab_c: evaluated by one rank only
    res["nan_output"] = outcome(lambda: sb.cross_source_matrix(tiny_model(), bad, ["ema"], transductive=True,
                                                               batch_size=5, progress=False))
    dist.barrier()
    return res


def test_every_verb_on_two_ranks_equals_one_process(tmp_path):
    ranks = run_ranks(_verbs, tmp_path)
    torch.set_num_threads(1)
    ds = tiny_data()
    for r, res in enumerate(ranks):
        for name in ("stats", "sequential", "absent", "capped", "one_batch", "precise_ddp", "matrix", "evaluate",
                     "recal_target", "recal_precise"):
            assert res[name]["ok"], (r, name, res[name])
    want = {
        "stats": sb.collect_stats(tiny_model(), ds, batch_size=8, progress=False),
        "sequential": sb.collect_stats(tiny_model(), ds, batch_size=8, mode="sequential", progress=False),
        "absent": sb.collect_stats(tiny_model(), ds, batch_size=16, progress=False),
        "capped": sb.collect_stats(tiny_model(), ds, batch_size=4, num_samples=13, progress=False),
        "one_batch": sb.collect_stats(tiny_model(), ds.subset("lab_c").take(range(6)), batch_size=8, progress=False),
    }
    for name, single in want.items():
        for res in ranks:
            assert_stats_close(sb.SourceStats.from_dict(res[name]["value"]), single)
    assert [want["capped"][s].num_samples for s in want["capped"]] == [13, 13, 9]
    # precise_bn on the DDP model's .module: one process over both ranks' batches, identical on every rank
    union = [b for r in range(2) for b in _loader(r, 2)]
    model = tiny_model()
    single = sb.precise_bn(model, union, num_samples=None, progress=False)
    for res in ranks:
        got = sb.BNStats.from_dict(res["precise_ddp"]["value"])
        for layer, m in single.items():
            np.testing.assert_allclose(got[layer].mean, m.mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got[layer].var, m.var, rtol=1e-10)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["precise_buffers"][k], v, rtol=1e-10, atol=1e-12)
        assert torch.equal(ranks[0]["precise_buffers"][k], ranks[1]["precise_buffers"][k])
    # the matrix: every strategy's rows, metrics and bootstrap intervals identical on both ranks and to one process
    table = sb.cross_source_matrix(tiny_model(), ds, **MATRIX)
    assert set(table["strategy"]) >= {"tent-offline:2", "tent", "prior:4@all", "prior:2:8", "batch:4", "batch:4:mixed",
                                     "stats:lab_c", "prior:4", "per-source"}
    for res in ranks:
        assert_same_table(res["matrix"]["value"], table)
        one = sb.cross_source_matrix(tiny_model(), ds, ["target"], progress=False)
        assert_same_table(res["evaluate"]["value"], one)
    model = tiny_model()
    t = sb.sites.recalibrate(model, ds, target="lab_b", batch_size=4, progress=False)
    p = sb.sites.recalibrate(model, ds, method="precise", batch_size=8, progress=False)
    for res in ranks:
        for name, single in (("recal_target", t), ("recal_precise", p)):
            got = sb.BNStats.from_dict(res[name]["value"])
            assert got.num_samples == single.num_samples
            for layer, m in single.items():
                np.testing.assert_allclose(got[layer].var, m.var, rtol=1e-10)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(res["recal_buffers"][k], v, rtol=1e-10, atol=1e-12)
    # labels read from the evaluation batches (no label accessor): each rank read its rows, gathered
    tapped = {"strategies": ["ema", "batch:4", "tent-offline:1"], "transductive": True, "batch_size": 5,
              "progress": False}
    want = sb.cross_source_matrix(tiny_model(), ds, **tapped)
    for res in ranks:
        assert_same_table(res["tapped"]["value"], want)
    # NaN outputs on one rank's rows: the same error on both ranks, counted over the whole source
    assert ranks[0]["nan_output"] == ranks[1]["nan_output"]
    assert not ranks[0]["nan_output"]["ok"] and "1 of 9 samples of source 'lab_c'" in ranks[0]["nan_output"]["message"]
