"""Cost of exact BN statistics: collect_stats vs an eval-mode forward, precise_bn vs fvcore (prints ratios).

Why: collect_stats must cost about one inference pass (the floor: a plain ``torch.no_grad`` eval-mode
forward of the same model over the same in-memory batches), and precise_bn no more than fvcore's
``update_bn_stats``. Three reduction paths are timed: eager (``fused=False``, the two-pass float64
copy), compiled (the ``torch.compile``d float64 reduction before torch's own BN; compiled in a warm-up
call before timing) and native (the default on CPU: ``bn.native``'s C kernel, statistics and BN output
in one call). Their exactness is checked against numpy float64 on inputs offset by 1e4.

``--steady-malloc``: glibc's malloc gives large freed blocks back to the kernel and takes fresh, zeroed
pages again at random points of a run (~200k minor page faults per pass here, 10 % of the time, hitting
floor and ours alike); this re-runs the script with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/
MALLOC_TOP_PAD_ fixed so the allocator keeps its memory, to time the computation alone. The page faults
of each path are printed either way.

``--device cuda``: model and batches on the GPU, each timed call ends with ``torch.cuda.synchronize()``;
there the C kernel does not apply, so "native" is the default path on CUDA (the compiled reduction).

Run: python benchmarks/bench_stats.py [--model resnet18|resnet50|smallresnet] [--batches N] [--batch-size B]
     [--repeats R] [--threads 1] [--skip-precise] [--steady-malloc] [--device cpu|cuda]
Defaults: resnet18(num_classes=2), 40 batches of 32x3x96x96; smallresnet (width 16), 20 of 64x3x32x32;
resnet50(num_classes=2), 8 batches of 256x3x224x224 (meant for a GPU: ``--device cuda``).
All timings come from one run, the functions interleaved round by round; printed are the fastest
and the median round, of the wall time and of the process's CPU time (1 torch thread: CPU time is
what other processes on a shared machine disturb least). Throughput ratio = floor time / our time
(higher is better); precise_bn's time ratio = ours / fvcore (lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import torch
from _timing import PICKS, eval_floors, interleaved, pick
from resnets import resnet18, resnet50
from torch import nn

import shiftbn as sb
import shiftbn.bn.collect as collect_mod
from shiftbn.studies.models import SmallResNet

SHAPES = {"resnet18": (40, 32, 96), "resnet50": (8, 256, 224), "smallresnet": (20, 64, 32)}
TARGETS = {"resnet18": 0.95, "resnet50": 0.95, "smallresnet": 0.85}


def exactness(offset: float = 1e4, batches: int = 20, shape: tuple = (32, 64, 24, 24)) -> dict[str, float]:
    """Max relative error of the mean and variance of a BN input offset by ``offset``, per path, vs numpy
    float64 over the same float32 values (a lone BatchNorm2d sees the data directly)."""
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(shape, generator=g) * (1 + k % 3) + offset) for k in range(batches)]
    ref = np.concatenate([x.numpy().astype(np.float64) for x in xs]).transpose(1, 0, 2, 3).reshape(shape[1], -1)
    mean_ref, var_ref = ref.mean(1), ref.var(1)
    model = nn.Sequential(nn.BatchNorm2d(shape[1]))
    out = {}
    for name, fused in (("eager", False), ("compiled", True), ("native", None)):
        with _compiled_only(name == "compiled"):
            m = sb.collect_stats(model, xs, by_source=False, mode="batch", options=sb.CollectOptions(fused=fused),
                                 progress=False).pooled()
        layer = m.layers["0"]
        out[f"{name}_mean"] = float(np.max(np.abs(layer.mean - mean_ref) / np.abs(mean_ref)))
        out[f"{name}_var"] = float(np.max(np.abs(layer.var - var_ref) / var_ref))
    return out


@contextlib.contextmanager
def _compiled_only(on: bool):
    """Keep collect_stats off the C kernel (the torch.compile'd reduction then serves ``fused=True``)."""
    saved = collect_mod._use_native
    if on:
        collect_mod._use_native = lambda fused, device: False
    try:
        yield
    finally:
        collect_mod._use_native = saved


def _steady_malloc() -> None:
    """Re-run this script with glibc's malloc told to keep its memory (see the module docstring)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000",
           "MALLOC_TOP_PAD_": "268435456", "SHIFTBN_BENCH_STEADY": "1"}
    args = [a for a in sys.argv[1:] if a != "--steady-malloc"]
    sys.exit(subprocess.call([sys.executable, sys.argv[0], *args], env=env))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="resnet18")
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--sources", type=int, default=4, help="source ids cycled over the batches (default 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core VM two threads make timings vary by +-40%%)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-precise", action="store_true", help="time collect_stats only (not precise_bn, fvcore)")
    ap.add_argument("--steady-malloc", action="store_true", help="fix glibc malloc's thresholds (see above)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False here; run with --device cpu")
    if args.steady_malloc and not os.environ.get("SHIFTBN_BENCH_STEADY"):
        _steady_malloc()
    torch.set_num_threads(args.threads)
    n_batches, bs, size = SHAPES[args.model]
    n_batches, bs = args.batches or n_batches, args.batch_size or bs
    model = {"resnet18": lambda: resnet18(num_classes=2), "resnet50": lambda: resnet50(num_classes=2),
             "smallresnet": lambda: SmallResNet(in_channels=3, width=16)}[args.model]()
    model.eval().to(device)
    g = torch.Generator().manual_seed(0)
    batches = [((torch.randn(bs, 3, size, size, generator=g) + k % args.sources).to(device), torch.zeros(bs),
                torch.full((bs,), k % args.sources)) for k in range(n_batches)]
    xs = [b[0] for b in batches]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
          f"{args.model} with {len(sb.bn_layers(model))} BN layers, {n_batches} batches of {bs}x3x{size}x{size}, "
          f"{args.sources} sources; {args.repeats} interleaved rounds; device "
          + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))

    # the forward with the initial BN buffers and with the data's population statistics (max-pooling's time
    # depends on the activations it sees: up to 25 % per op here)
    floor, floor_pop = eval_floors(model, xs)

    def compiled():
        with _compiled_only(True):
            sb.collect_stats(model, batches, mode="batch", options=sb.CollectOptions(fused=True), progress=False)

    fns = {"floor": floor, "floor_pop": floor_pop,
           "eager": lambda: sb.collect_stats(model, batches, mode="batch", options=sb.CollectOptions(fused=False),
                                             progress=False),
           "compiled": compiled,
           "native": lambda: sb.collect_stats(model, batches, mode="batch", progress=False)}
    try:
        if args.skip_precise:
            raise ImportError
        from fvcore.nn.precise_bn import update_bn_stats

        fns["fvcore"] = lambda: update_bn_stats(copy.deepcopy(model).train(), xs, num_iters=len(xs))
        fns["precise_eager"] = lambda: sb.precise_bn(copy.deepcopy(model), xs, num_samples=None, fused=False,
                                                     progress=False)
        fns["precise_native"] = lambda: sb.precise_bn(copy.deepcopy(model), xs, num_samples=None, progress=False)
    except ImportError:
        if not args.skip_precise:
            print("fvcore not installed: pip install fvcore to compare precise_bn with it")
    if device.type == "cuda":  # the GPU runs asynchronously: a call is done when its kernels are
        fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    for fn in fns.values():  # warm-up, and the fused kernel's one-time compile, outside the timings
        fn()
    times = interleaved(fns, args.repeats)
    target = TARGETS[args.model]
    for clock in ("wall", "cpu"):
        for stat, _ in PICKS:
            t = pick(times, clock, stat)
            print(f"-- {clock} time, {stat} over {args.repeats} interleaved rounds")
            print(f"floor: eval-mode no_grad forward   {t['floor']:7.3f} s   (initial BN buffers)")
            print(f"floor_pop: the same, population BN {t['floor_pop']:7.3f} s   (buffers = the data's statistics)")
            for path in ("eager", "compiled", "native"):
                label = "default" if path == "native" and device.type == "cuda" else path
                print(f"collect_stats batch, {label:8s}    {t[path]:7.3f} s   throughput ratio "
                      f"{t['floor'] / t[path]:5.3f}  vs pop {t['floor_pop'] / t[path]:5.3f}  (target >= {target})")
            if "fvcore" in t:
                print(f"fvcore update_bn_stats             {t['fvcore']:7.3f} s")
                for path in ("eager", "native"):
                    tp = t[f"precise_{path}"]
                    print(f"precise_bn, {path:6s}               {tp:7.3f} s   time ratio vs fvcore "
                          f"{tp / t['fvcore']:5.3f}  (target <= 1.0)")
    faults = {k: int(statistics.median(v["faults"])) for k, v in times.items()}
    print("minor page faults per run (median): " + ", ".join(f"{k} {v:,}" for k, v in faults.items())
          + ("  [steady malloc]" if os.environ.get("SHIFTBN_BENCH_STEADY") else "  [default malloc]"))
    err = exactness()
    print("exactness vs numpy float64, offset 1e4 (max relative error): "
          + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))


if __name__ == "__main__":
    main()
