import json
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import shiftbn as sb
from shiftbn.bn.moments import SourceStats


def _model():
    # float64 so that forward passes on 1 and 2 threads agree far below the 1e-10 being tested
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    return net.double()


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(2):
        for _ in range(5):
            x = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64) * (1 + k) + 3.0 * k + 100.0
            out.append((x, torch.zeros(8), torch.full((8,), k)))
    return out


def _worker(rank, world, port, out_dir, mode):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = _batches()[rank::world]  # each rank sees part of every source
        stats = sb.collect_stats(_model(), mine, mode=mode, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(stats.to_dict(), f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    for mode in ("batch", "sequential"):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)
        ranks = [SourceStats.from_dict(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in range(2)]
        single = sb.collect_stats(_model(), _batches(), mode=mode, progress=False)
        for got in ranks:
            assert list(got) == list(single)
            for src in single:
                for layer, m in single[src].items():
                    assert got[src][layer].count == m.count
                    np.testing.assert_allclose(got[src][layer].mean, m.mean, rtol=1e-10)
                    np.testing.assert_allclose(got[src][layer].var, m.var, rtol=1e-10)
