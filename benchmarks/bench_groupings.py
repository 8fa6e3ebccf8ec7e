"""Cost of one grouping of ``batch:B`` and per-batch ``prior:N`` vs a plain eval forward of the same samples.

Why: grouping-dependent strategies are scored over 5 seeded groupings by default (10 of the 13
evaluation passes of a five-strategy matrix), so each grouping should cost about one plain forward
of the same samples in the same batch size. Inputs: a preloaded tensor and a dataset (a
``SourceTaggedDataset`` over a ``TensorDataset``, read through the DataLoader as the matrix reads a
cached dataset). "batch training kernel" is the same grouping through PyTorch's training-mode
BN kernel (how ``batch:B`` ran before it normalized with its measured moments). Plain =
``model.eval()`` + ``no_grad`` forwards over contiguous batches of B of the preloaded tensor. CPU time
of this process (and wall), min and median of interleaved rounds.

Run: python benchmarks/bench_groupings.py [--n 1000] [--size 64] [--batch 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from _timing import PICKS, interleaved, pick
from torch.utils.data import TensorDataset

import shiftbn as sb
from shiftbn._torch import batch_chunks
from shiftbn.adapt.prior import prior_batch_logits
from shiftbn.bn.batchstats import batch_stats_logits, normalizing_with
from shiftbn.studies.models import SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="samples (default 1000: one matrix's evaluation half)")
    ap.add_argument("--size", type=int, default=64, help="image side (3 channels)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="SmallCNN width")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    ds = sb.SourceTaggedDataset(TensorDataset(x, torch.zeros(args.n, dtype=torch.long)), ["a"] * args.n)
    model = SmallCNN(in_channels=3, num_classes=2, width=args.width).eval()
    b = args.batch

    @torch.no_grad()
    def plain():
        for i in range(0, args.n, b):
            model(x[i:i + b])

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def training_kernel():  # batch:B as it was in 0.1.0: PyTorch's training-mode BN kernel, same batches
        with normalizing_with(model, [], lambda *a: None, native=bns):
            for idx in batch_chunks(args.n, b, 1):
                model(x[idx])

    fns = {"plain": plain,
           "batch training kernel": training_kernel,
           "batch tensor": lambda: batch_stats_logits(model, x, b, 1),
           "batch dataset": lambda: batch_stats_logits(model, ds, b, 1),
           "prior tensor": lambda: prior_batch_logits(model, x, 16, b, 1),
           "prior dataset": lambda: prior_batch_logits(model, ds, 16, b, 1)}
    for fn in fns.values():
        fn()
    times = interleaved(fns, args.repeats)
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}; load {load[0]:.1f}/{load[1]:.1f}; {args.n} samples 3x{args.size}x{args.size}, "
          f"SmallCNN width {args.width}, batches of {b}, {args.repeats} interleaved rounds")
    for clock in ("cpu", "wall"):
        for stat, _ in PICKS:
            t = pick(times, clock, stat)
            print(f"{clock} {stat:6s}: " + ", ".join(f"{k} {v:.3f} s ({v / t['plain']:.2f}x)" for k, v in t.items()))


if __name__ == "__main__":
    main()
