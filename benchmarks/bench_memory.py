"""Peak memory of a statistics pass and of the matrix for N and 10N batches (prints peak RSS and ratios).

Why: a pass over a large dataset must keep O(layers x channels x sources) state, so 10x more data
must not need more memory (the issue measured ~4.4 GB extra after 3,000 batches of a model with two
BatchNorm1d(2048) layers on the old code). Each measurement runs in a fresh subprocess and reads its
peak RSS (``ru_maxrss``); the data is synthesized on the fly, so only the library can grow.

- ``collect_stats`` (``mode="batch"``, eager and fused) and fvcore ``update_bn_stats`` (the reference)
  on Linear(256, 2048)-BN1d(2048)-ReLU-Linear(2048, 2048)-BN1d(2048), batches of 8, N and 10N batches.
- ``cross_source_matrix`` (source, precise, target, stats:*) with a SmallCNN on a map-style dataset
  whose items are generated from their index (3x32x32, 4 sources), N and 10N samples.

Run: python benchmarks/bench_memory.py [--batches 300] [--samples 4000]
Target: RSS(10N) / RSS(N) <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


class _Batches:
    """``n`` batches of 8x256, each drawn from its own seed when iterated (re-iterable, nothing stored)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for k in range(self.n):
            yield torch.randn(8, 256, generator=torch.Generator().manual_seed(k))


class _Synth(Dataset):
    """Images 3x32x32 synthesized from their index (source offset + noise): nothing is held in memory."""

    def __init__(self, n: int, sources: int) -> None:
        self.n, self.sources = n, sources

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) + 0.5 * (i % self.sources)
        return x, i % 10


def _rss_now_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _child(kind: str, n: int) -> dict:
    """Run one measurement in this (fresh) process; peak and pre-call RSS in KiB."""
    import shiftbn as sb

    torch.set_num_threads(1)
    if kind == "matrix":
        from shiftbn.studies.models import SmallCNN

        sources = 4
        ds = sb.SourceTaggedDataset(_Synth(n, sources), [f"s{i % sources}" for i in range(n)],
                                    labels=[i % 10 for i in range(n)])
        model = SmallCNN(in_channels=3, width=16).eval()
        before = _rss_now_kb()
        sb.cross_source_matrix(model, ds, progress=False)
    else:
        model = nn.Sequential(nn.Linear(256, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 2048),
                              nn.BatchNorm1d(2048))
        data = _Batches(n)
        if kind == "fused":  # compile the kernel outside the measured growth
            sb.collect_stats(model, _Batches(3), by_source=False, options=sb.CollectOptions(fused=True), progress=False)
        before = _rss_now_kb()
        if kind == "fvcore":
            from fvcore.nn.precise_bn import update_bn_stats

            update_bn_stats(model.train(), data, num_iters=n)
        else:
            sb.collect_stats(model, data, by_source=False, mode="batch",
                             options=sb.CollectOptions(fused=kind == "fused"), progress=False)
    return {"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _measure(kind: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n)], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} n={n} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=300, help="N for the statistics passes (batches of 8)")
    ap.add_argument("--samples", type=int, default=4000,
                    help="N for the matrix (samples; 4,000 fills its evaluation batches of 256 per source)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]))))
        return
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 torch thread, one fresh process per figure")
    cases = [("eager", "collect_stats batch, eager", args.batches, "batches"),
             ("fused", "collect_stats batch, fused", args.batches, "batches"),
             ("fvcore", "fvcore update_bn_stats", args.batches, "batches"),
             ("matrix", "cross_source_matrix", args.samples, "samples")]
    for kind, label, n, unit in cases:
        try:
            small, big = _measure(kind, n), _measure(kind, 10 * n)
        except RuntimeError as e:
            print(f"{label}: {e}")
            continue
        grow_small = (small["peak_kb"] - small["before_kb"]) / 1024
        grow_big = (big["peak_kb"] - big["before_kb"]) / 1024
        print(f"{label:28s} peak RSS {small['peak_kb'] / 1024:7.0f} MiB ({n:,} {unit}) -> "
              f"{big['peak_kb'] / 1024:7.0f} MiB ({10 * n:,}); ratio {big['peak_kb'] / small['peak_kb']:5.3f} "
              f"(target <= 1.2); growth during the call {grow_small:6.1f} -> {grow_big:6.1f} MiB")


if __name__ == "__main__":
    main()
