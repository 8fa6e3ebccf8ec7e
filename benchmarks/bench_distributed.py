"""Scaling over ranks: 1 process vs W gloo ranks on the same data, and the cost of the one all-gather.

Why: under ``torchrun`` every verb shards its batches over ranks and merges moments exactly with one
all-gather per pass; the speed-up should approach W while the all-gather stays negligible. On this
machine (2 cores) W = 2 with one torch thread per rank is the most that can be measured.

Run: python benchmarks/bench_distributed.py [--world 2] [--samples 1536] [--repeats 3] [--threads 1]
Measures, with ``--threads`` torch threads per process (1 and W processes on the same data):
  * ``collect_stats`` (per-source, batch mode, batches of 64) and ``precise_bn``;
  * ``cross_source_matrix`` with source, target and stats:* (3 sources, calibration 0.5);
  * the all-gather of a ResNet-18's moments (20 BN layers, 4,800 channels) for 1 and 5 sources:
    bytes per rank and milliseconds per merge (median of 20).
Wall times on W ranks run to the slowest rank; CPU times are the busiest rank's (on a shared machine
the CPU time says what W free cores would give: the work each rank does, including the all-gather).
The fastest of ``--repeats`` rounds is printed with the median in brackets; speed-up = 1-process
time / W-rank time.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from resnets import resnet18
from torch.utils.data import TensorDataset

import shiftbn as sb
from shiftbn.bn.distributed import _pack, all_merge
from shiftbn.bn.moments import BNStats, Moments, SourceStats
from shiftbn.studies.models import SmallResNet


def _data(samples: int) -> sb.SourceTaggedDataset:
    g = torch.Generator().manual_seed(0)
    per = samples // 3
    x = torch.cat([torch.randn(per, 3, 32, 32, generator=g) * (1 + k) + k for k in range(3)])
    y = torch.randint(0, 10, (3 * per,), generator=g)
    return sb.SourceTaggedDataset(TensorDataset(x, y), np.repeat(["a", "b", "c"], per), y.numpy())


def _tasks(samples: int) -> dict:
    ds = _data(samples)
    model = SmallResNet(in_channels=3, num_classes=10, width=16).eval()
    return {
        "collect_stats": lambda: sb.collect_stats(model, ds, batch_size=64, progress=False),
        "precise_bn": lambda: sb.precise_bn(model, ds, num_samples=None, batch_size=64, progress=False),
        "matrix": lambda: sb.cross_source_matrix(model, ds, ["ema", "target", "stats:*"], batch_size=128,
                                                 progress=False),
    }


def _resnet18_stats(sources: int) -> SourceStats:
    channels = [layer.module.num_features for layer in sb.bn_layers(resnet18(num_classes=2))]
    rng = np.random.default_rng(0)
    return SourceStats({f"s{k}": BNStats({f"bn{i}": Moments(1000, rng.normal(size=c), rng.random(c) + 1)
                                          for i, c in enumerate(channels)}, 1000) for k in range(sources)})


def _time(tasks: dict, repeats: int, barrier) -> dict[str, dict[str, list[float]]]:
    """Wall time (to the slowest rank, barriers around) and this process's CPU time per round."""
    out = {k: {"wall": [], "cpu": []} for k in tasks}
    for _ in range(repeats):
        for k, fn in tasks.items():
            barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            c1 = time.process_time()
            barrier()
            out[k]["wall"].append(time.perf_counter() - t0)
            out[k]["cpu"].append(c1 - c0)
    return out


def _worker(rank: int, world: int, port: int, args, path: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TQDM_DISABLE": "1"})
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        times = _time(_tasks(args.samples), args.repeats, dist.barrier)
        gather = {}
        for sources in (1, 5):
            stats = _resnet18_stats(sources)
            all_merge(stats)  # warm-up
            ts = []
            for _ in range(20):
                dist.barrier()
                t0 = time.perf_counter()
                all_merge(stats)
                ts.append(time.perf_counter() - t0)
            gather[sources] = {"ms": 1e3 * statistics.median(ts), "bytes": len(pickle.dumps(_pack(stats)))}
        every = [None] * world
        dist.all_gather_object(every, times)
        if rank == 0:  # per round, the busiest rank's CPU time
            for k in times:
                times[k]["cpu"] = [max(t[k]["cpu"][i] for t in every) for i in range(len(times[k]["cpu"]))]
            with open(path, "wb") as f:
                pickle.dump({"times": times, "gather": gather}, f)
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    one = _time(_tasks(args.samples), args.repeats, lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.pkl")
        mp.spawn(_worker, args=(args.world, _port(), args, path), nprocs=args.world, join=True)
        with open(path, "rb") as f:
            res = pickle.load(f)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{args.threads} thread(s) per process; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{args.samples} samples (3 sources, 3x32x32), SmallResNet(width 16)")
    for clock in ("wall", "cpu"):
        print(f"{clock} time{' (busiest rank)' if clock == 'cpu' else ''}:")
        print(f"  {'task':<15}{'1 process [s]':>20}{f'{args.world} ranks [s]':>20}{'speed-up':>10}")
        for k in one:
            a, b = one[k][clock], res["times"][k][clock]
            print(f"  {k:<15}{min(a):>10.3f} [{statistics.median(a):.3f}]{min(b):>12.3f} [{statistics.median(b):.3f}]"
                  f"{min(a) / min(b):>10.2f}")
    for sources, g in res["gather"].items():
        print(f"all-gather of ResNet-18 moments, {sources} source(s): {g['bytes'] / 1e3:.1f} kB per rank, "
              f"{g['ms']:.2f} ms per merge ({args.world} gloo ranks)")


if __name__ == "__main__":
    main()
