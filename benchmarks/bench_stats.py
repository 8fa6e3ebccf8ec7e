"""Cost of exact BN statistics: collect_stats vs a plain forward, precise_bn vs fvcore (prints ratios).

Run: python benchmarks/bench_stats.py [--batches 40] [--batch-size 64] [--repeats 3]
All timings are taken in the same run on the same batches, the functions interleaved; ratios are
printed for the fastest and for the median round (this 2-core VM's timings vary by +-20%).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

import shiftbn as sb
from shiftbn.models import SmallResNet


def _interleaved(fns: dict, repeats: int) -> dict:
    """All timings of each function over ``repeats`` rounds, the functions alternating within a round
    so that a noisy machine slows them all alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core VM two threads make timings vary by +-40%%)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallResNet(in_channels=3, width=16)
    n_bn = len(sb.bn_layers(model))
    batches = [(torch.randn(args.batch_size, 3, 32, 32) + k % args.sources, torch.zeros(args.batch_size),
                torch.full((args.batch_size,), k % args.sources)) for k in range(args.batches)]
    xs = [b[0] for b in batches]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"SmallResNet with {n_bn} BN layers, {args.batches} batches of {args.batch_size}x3x32x32")

    def plain():
        m = model.train()
        with torch.no_grad():
            for x in xs:
                m(x)

    def ours_by_source():
        sb.collect_stats(model, batches, mode="batch", progress=False)

    def ours_pooled():
        sb.collect_stats(model, xs, by_source=False, mode="batch", progress=False)

    fns = {"plain": plain, "src": ours_by_source, "pool": ours_pooled}
    try:
        from fvcore.nn.precise_bn import update_bn_stats

        fns["fv"] = lambda: update_bn_stats(copy.deepcopy(model).train(), xs, num_iters=len(xs))
        fns["precise"] = lambda: sb.precise_bn(copy.deepcopy(model), xs, num_samples=None, progress=False)
    except ImportError:
        print("fvcore not installed: pip install fvcore to compare precise_bn with it")
    plain()  # warm-up
    times = _interleaved(fns, args.repeats)
    for stat, pick in (("min", min), ("median", statistics.median)):
        t = {k: pick(v) for k, v in times.items()}
        print(f"-- {stat} over {args.repeats} interleaved rounds")
        print(f"plain train-mode forward      {t['plain']:7.3f} s")
        print(f"collect_stats, {args.sources} sources     {t['src']:7.3f} s   throughput ratio "
              f"{t['plain'] / t['src']:5.2f}  (target >= 0.90)")
        print(f"collect_stats, pooled         {t['pool']:7.3f} s   throughput ratio {t['plain'] / t['pool']:5.2f}")
        if "fv" in t:
            print(f"fvcore update_bn_stats        {t['fv']:7.3f} s")
            print(f"precise_bn                    {t['precise']:7.3f} s   time ratio vs fvcore "
                  f"{t['precise'] / t['fv']:5.2f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
