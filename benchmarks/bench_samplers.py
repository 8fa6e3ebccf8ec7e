"""How fast SourceBatchSampler builds an epoch: 10 million samples in 1,000 sources (prints figures).

Run: python benchmarks/bench_samplers.py [--n 10000000] [--sources 1000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np

from shiftbn.samplers import SourceBatchSampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Unequal source sizes (log-normal), as real multi-site data has.
    weights = rng.lognormal(sigma=0.5, size=args.sources)
    ids = rng.choice(args.sources, size=args.n, p=weights / weights.sum())
    print(f"machine: {platform.processor() or platform.machine()}, {args.n:,} samples, "
          f"{args.sources} sources, batch {args.batch_size}")
    # Every source in every batch needs batches larger than the number of sources.
    big_batch = 4 * args.sources
    cases = [("random", None, "proportional", args.batch_size),
             ("single", None, "proportional", args.batch_size),
             ("single", None, "equal", args.batch_size),
             ("mixed", None, "equal", big_batch),
             ("mixed", 4, "proportional", args.batch_size)]
    for mode, k, balance, bs in cases:
        t0 = time.perf_counter()
        s = SourceBatchSampler(ids, bs, mode, sources_per_batch=k, balance=balance, seed=0)
        t1 = time.perf_counter()
        s.set_epoch(1)
        s.epoch_batches()
        t2 = time.perf_counter()
        print(f"{mode:7s} k={k!s:4s} {balance:12s} batch {bs:5d} construct+epoch0 {t1 - t0:6.2f} s   "
              f"one more epoch {t2 - t1:6.2f} s   batches {len(s):,}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB ({rss * 2**20 / args.n:.0f} bytes per sample)")


if __name__ == "__main__":
    main()
