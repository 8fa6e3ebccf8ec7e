"""`run_study` on 2 gloo ranks: cells spread over ranks, the folder written once by rank 0, resume exact,
and a rank that dies mid-pass stops the other with a clear error (no results.csv, only whole cells)."""

import json
import os
import time

import pandas as pd
import pytest
import torch
import torch.distributed as dist

import shiftbn as sb
from shiftbn.bn.distributed import RankSync
from shiftbn.studies import parse_spec
from tests.distributed_helpers import outcome, run_ranks

SPEC = {"study": {"protocol": "held_out_sources", "dataset": {"name": "blobs-labs", "n": 120}},
        "params": {"model": {"name": "MLP", "hidden": 8}, "steps": 8, "seeds": [0, 1],
                   "strategies": ["ema", "precise", "target"]}}


def _open(path, rank, resume=False):
    sync = RankSync()
    return sync.check(lambda: sb.studies.RunFolder(path, {"spec": "t"}, resume=resume) if rank == 0 else None)


def _study(rank, world, out_dir):
    spec = parse_spec(SPEC)
    folder = os.path.join(out_dir, "dist")
    run = _open(folder, rank)
    first = sb.studies.run_study(spec, run, progress=False)
    if run is not None:
        run.close()
        for name in sorted(os.listdir(os.path.join(folder, "cells")))[::3]:  # an interrupted run: cells lost
            os.remove(os.path.join(folder, "cells", name))
        os.remove(os.path.join(folder, "results.csv"))
    dist.barrier()
    run = _open(folder, rank, resume=True)
    again = sb.studies.run_study(spec, run, progress=False)
    if run is not None:
        run.close()
    refused = outcome(lambda: _open(folder, rank))  # rank 0's refusal reaches rank 1 too
    return {"first": first, "again": again, "refused": refused}


@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_study_on_two_ranks_equals_one_process_and_resumes(tmp_path):
    ranks = run_ranks(_study, tmp_path)
    torch.set_num_threads(1)
    with sb.studies.RunFolder(tmp_path / "single", {"spec": "t"}) as run:
        single = sb.studies.run_study(parse_spec(SPEC), run, progress=False)
    assert len(single) > 0 and single["held_out"].nunique() >= 3
    for res in ranks:
        pd.testing.assert_frame_equal(res["first"], single, check_exact=True)
        pd.testing.assert_frame_equal(res["again"], single, check_exact=True)
        assert not res["refused"]["ok"] and "rank 0 of 2" in res["refused"]["message"]
        assert "already holds a run" in res["refused"]["message"]
    assert (tmp_path / "dist" / "results.csv").read_bytes() == (tmp_path / "single" / "results.csv").read_bytes()
    log = [json.loads(line) for line in (tmp_path / "dist" / "log.jsonl").read_text().splitlines()]
    n_cells = len(list((tmp_path / "dist" / "cells").iterdir()))
    resumed = log[n_cells:]
    computed = [e for e in resumed if e["status"] == "computed"]
    assert 0 < len(computed) < n_cells and len(resumed) == n_cells  # only the lost cells were recomputed
    assert all(e["seconds"] > 0 for e in computed)


def _dies(rank, world, out_dir):
    spec = parse_spec(SPEC)
    if rank == 1:
        from shiftbn.studies.heldout import HeldOutSources

        def die(self, ds, seed, value):
            time.sleep(0.5)
            os._exit(3)  # killed mid-pass: no exception, no goodbye

        HeldOutSources.cell = die
    run = _open(os.path.join(out_dir, "dies"), rank)
    t0 = time.monotonic()
    res = outcome(lambda: sb.studies.run_study(spec, run, progress=False))
    return {**res, "seconds": time.monotonic() - t0}


@pytest.mark.slow  # an end-to-end run of 10+ s: make test-slow
def test_a_rank_that_dies_mid_pass_stops_the_others_cleanly(tmp_path):
    ranks = run_ranks(_dies, tmp_path, env={"PG_TIMEOUT": "20"}, allow_death=True)
    assert ranks[1] is None  # it died
    res = ranks[0]
    assert not res["ok"] and res["type"] == "PeerLostError", res
    assert "lost contact with the other ranks" in res["message"] and res["seconds"] < 30
    folder = tmp_path / "dies"
    assert not (folder / "results.csv").exists()
    for cell in (folder / "cells").iterdir():  # rank 0's first cell is whole or absent, never half-written
        assert cell.read_bytes().startswith(b"# shiftbn-cell ")
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]
