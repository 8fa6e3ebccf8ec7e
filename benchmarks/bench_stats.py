"""Cost of exact BN statistics: collect_stats vs a plain forward, precise_bn vs fvcore (prints ratios).

Run: python benchmarks/bench_stats.py [--batches 40] [--batch-size 64] [--repeats 3]
All timings are taken in the same run on the same batches; the best of ``--repeats`` is used.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

import shiftbn as sb
from shiftbn.models import SmallResNet


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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

    plain()  # warm-up
    t_plain = _best(plain, args.repeats)
    t_src = _best(ours_by_source, args.repeats)
    t_pool = _best(ours_pooled, args.repeats)
    print(f"plain train-mode forward      {t_plain:7.3f} s")
    print(f"collect_stats, {args.sources} sources     {t_src:7.3f} s   throughput ratio {t_plain / t_src:5.2f}"
          "  (target >= 0.90)")
    print(f"collect_stats, pooled         {t_pool:7.3f} s   throughput ratio {t_plain / t_pool:5.2f}")
    try:
        from fvcore.nn.precise_bn import update_bn_stats
    except ImportError:
        print("fvcore not installed: pip install fvcore to compare precise_bn with it")
        return

    def fv():
        update_bn_stats(copy.deepcopy(model).train(), xs, num_iters=len(xs))

    def ours_precise():
        sb.precise_bn(copy.deepcopy(model), xs, num_samples=None, progress=False)

    t_fv = _best(fv, args.repeats)
    t_pr = _best(ours_precise, args.repeats)
    print(f"fvcore update_bn_stats        {t_fv:7.3f} s")
    print(f"precise_bn                    {t_pr:7.3f} s   time ratio vs fvcore {t_pr / t_fv:5.2f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
