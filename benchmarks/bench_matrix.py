"""Cost of cross_source_matrix vs the forward passes it cannot avoid, done in a bare loop (prints ratio).

Run: python benchmarks/bench_matrix.py [--dataset digits-labs] [--repeats 3]
For S sources and the default strategies (source, precise, target, stats:*) the unavoidable work is
one statistics pass over the calibration data in single-source batches, one in mixed batches (for
precise), plus S*S + 2S evaluation passes (stats:i on j for every pair -- target shares stats:j on
j -- plus source and precise on every j). Target: <= 1.25.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import shiftbn as sb
from shiftbn._torch import stack_inputs
from shiftbn.evaluate import cross_source_matrix
from shiftbn.models import SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits-labs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core VM two threads make timings vary by +-40%%)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = sb.load(args.dataset)
    model = SmallCNN(in_channels=ds[0][0].shape[0], width=args.width).eval()
    sources = ds.sources_present
    split = ds.split(fractions=(0.0, 0.5, 0.5), seed=0)
    cal = {s: stack_inputs(split.calibration.subset(s)) for s in sources}
    ev = {s: stack_inputs(split.test.subset(s)) for s in sources}
    n_eval_passes = len(sources) ** 2 + 2 * len(sources)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; {args.dataset}: {len(ds)} samples, "
          f"{len(sources)} sources; SmallCNN width {args.width}; 2 stats passes + "
          f"{n_eval_passes} eval passes")

    @torch.no_grad()
    def bare():
        model.train()
        for _ in range(2):  # single-source statistics pass, then the mixed one for precise
            for x in cal.values():
                for i in range(0, len(x), 64):
                    model(x[i : i + 64])
        model.eval()
        for _ in range(len(sources) + 2):
            for x in ev.values():
                for i in range(0, len(x), 256):
                    model(x[i : i + 256])

    def matrix():
        cross_source_matrix(model, ds, metrics=["accuracy"], calibration=split, progress=False)

    bare()
    times = {"bare": [], "matrix": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("matrix", matrix)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for stat, pick in (("min", min), ("median", statistics.median)):
        t = {k: pick(v) for k, v in times.items()}
        print(f"-- {stat} over {args.repeats} interleaved rounds")
        print(f"bare forward passes   {t['bare']:7.3f} s")
        print(f"cross_source_matrix   {t['matrix']:7.3f} s   ratio {t['matrix'] / t['bare']:5.2f}  (target <= 1.25)")


if __name__ == "__main__":
    main()
