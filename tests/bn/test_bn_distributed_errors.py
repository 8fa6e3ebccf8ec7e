"""Distributed collect_stats with two gloo ranks: empty ranks, errors on one rank, global caps."""

import json
import os
import socket
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import shiftbn as sb
from shiftbn.bn.moments import SourceStats
from tests.bn.test_bn_distributed import _batches, _model
from tests.distributed_helpers import hang_limit


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outcome(fn):
    try:
        return {"ok": True, "stats": fn().to_dict()}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def _nan_batches(rank):
    out = _batches()[rank::2]
    if rank == 1:
        out[0][0][0, 0, 0, 0] = float("nan")
    return out


def _capped(rank):
    return _batches()[rank::2]


SCENARIOS = {
    # name: (data for rank r, collect_stats keyword arguments)
    "empty_batch": (lambda r: _batches() if r == 0 else [], {"mode": "batch"}),
    "empty_sequential": (lambda r: _batches() if r == 0 else [], {"mode": "sequential"}),
    "all_empty": (lambda r: [], {}),
    "nan_on_rank1": (_nan_batches, {}),
    "unsharded": (lambda r: _batches(), {}),
    "cap": (_capped, {"num_samples": 20}),
}


def _worker(rank, world, port, out_dir, names, limit):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=limit))
    try:
        for name in names:
            data, kwargs = SCENARIOS[name]
            res = _outcome(lambda data=data, kwargs=kwargs: sb.collect_stats(_model(), data(rank), progress=False,
                                                                               **kwargs))
            with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, names):
    """Two gloo ranks run the scenarios (spawned: a fork of a process whose torch already ran on
    several threads can hang in its first convolution); fails (instead of hanging) past ``hang_limit()``."""
    limit = hang_limit()  # the parent's deadline and the ranks' process-group timeout alike
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), names, limit), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"distributed collect_stats did not finish within {limit:.0f} s (a rank hung)")
    out = {}
    for name in names:
        out[name] = []
        for r in range(2):
            path = tmp_path / f"{name}.rank{r}.json"
            assert path.exists(), f"rank {r} wrote no result for {name} (it died)"
            out[name].append(json.loads(path.read_text()))
    return out


def _assert_equal_stats(got: SourceStats, want: SourceStats):
    assert list(got) == list(want)
    for src in want:
        assert got[src].num_samples == want[src].num_samples
        for layer, m in want[src].items():
            assert got[src][layer].count == m.count
            np.testing.assert_allclose(got[src][layer].mean, m.mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got[src][layer].var, m.var, rtol=1e-10)


def test_rank_without_data_takes_part_and_global_cap(tmp_path):
    res = _run(tmp_path, ["empty_batch", "empty_sequential", "all_empty", "cap"])
    for name, mode in (("empty_batch", "batch"), ("empty_sequential", "sequential")):
        single = sb.collect_stats(_model(), _batches(), mode=mode, progress=False)
        ranks = []
        for r in range(2):
            assert res[name][r]["ok"], res[name][r]
            ranks.append(SourceStats.from_dict(res[name][r]["stats"]))
            _assert_equal_stats(ranks[-1], single)
        assert ranks[0].to_dict() == ranks[1].to_dict()  # identical on both ranks
    for r in range(2):
        assert not res["all_empty"][r]["ok"] and "data is empty on all 2 ranks" in res["all_empty"][r]["message"]
    # num_samples=20 under 2 ranks: each rank keeps 10 per source (8 + a cut batch of 2), 20 in total
    want_batches = []
    for src in range(2):
        for r in range(2):
            mine = [b for b in _capped(r) if int(b[2][0]) == src]
            want_batches += [mine[0], tuple(t[:2] for t in mine[1])]
    want = sb.collect_stats(_model(), want_batches, progress=False)
    for r in range(2):
        got = SourceStats.from_dict(res["cap"][r]["stats"])
        assert [got[s].num_samples for s in got] == [20, 20]
        _assert_equal_stats(got, want)


def test_error_on_one_rank_reaches_every_rank(tmp_path):
    res = _run(tmp_path, ["nan_on_rank1", "unsharded"])
    nan = res["nan_on_rank1"]
    assert not nan[0]["ok"] and not nan[1]["ok"]
    assert nan[0] == nan[1]  # the same error on both ranks
    assert nan[0]["type"] == "FloatingPointError"
    assert "rank 1 of 2" in nan[0]["message"] and "NaN or Inf" in nan[0]["message"]
    dup = res["unsharded"]
    assert dup[0] == dup[1] and dup[0]["type"] == "ValueError"
    assert "not sharded" in dup[0]["message"] and "num_replicas" in dup[0]["message"]
