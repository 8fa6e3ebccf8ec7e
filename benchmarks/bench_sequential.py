"""Cost of collect_stats(mode="sequential") in forward-equivalents on a chain of L BN layers (prints it).

Why: sequential statistics need one pass per BN layer (pass p fixes layer p - 1), but pass p only has
to run the network up to the layer it is fixing, so on a chain where each layer costs alike a
truncated schedule costs about (L + 3) / 2 forward passes instead of L + 2. The figure printed is
time(sequential) / time(one eval-mode ``no_grad`` forward over the same batches), with the number of
passes collect_stats reports; wall and CPU time (1 torch thread), fastest and median round.

Model: a chain of L x (Conv2d(C, C, 3, padding=1), BatchNorm2d(C), ReLU), then a linear head;
``--batches`` in-memory batches of ``--batch-size`` x C x ``--size`` x ``--size``.

Run: python benchmarks/bench_sequential.py [--layers 16] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import PICKS, interleaved, pick
from torch import nn

import shiftbn as sb


def chain(layers: int, channels: int, seed: int = 0) -> nn.Module:
    """``layers`` conv-BN-ReLU blocks of equal cost, then a linear head (eval mode)."""
    torch.manual_seed(seed)
    blocks = [m for _ in range(layers)
              for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core VM two threads make timings vary by +-40%%)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = chain(args.layers, args.channels)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch_size, args.channels, args.size, args.size, generator=g) + 1.0
          for _ in range(args.batches)]
    L = len(sb.bn_layers(model))
    target = (L + 3) / 2
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
          f"chain of L = {L} conv-BN-ReLU blocks ({args.channels} channels), {args.batches} batches of "
          f"{args.batch_size}x{args.channels}x{args.size}x{args.size}; {args.repeats} interleaved rounds")
    passes = {}

    def floor():
        with torch.no_grad():
            for x in xs:
                model(x)

    def sequential(fused: bool):
        def fn():
            passes[fused] = sb.collect_stats(model, xs, by_source=False, mode="sequential",
                                             options=sb.CollectOptions(fused=fused), progress=False).passes
        return fn

    fns = {"floor": floor, "eager": sequential(False), "fused": sequential(True)}
    for fn in fns.values():  # warm-up (and the fused kernel's compile) outside the timings
        fn()
    times = interleaved(fns, args.repeats)
    for clock in ("wall", "cpu"):
        for stat, _ in PICKS:
            t = pick(times, clock, stat)
            print(f"-- {clock} time, {stat} over {args.repeats} interleaved rounds: one eval-mode forward "
                  f"{t['floor']:.3f} s")
            for path, fused in (("eager", False), ("fused", True)):
                print(f"sequential, {path}: {t[path]:7.3f} s = {t[path] / t['floor']:5.2f} forward-equivalents "
                      f"({passes[fused]} passes reported; target <= (L+3)/2 = {target:g})")

if __name__ == "__main__":
    main()
