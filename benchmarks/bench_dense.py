"""Dense models: a 3-D U-Net's statistics vs its eval-mode forward, sliding windows, per-case metrics (ratios).

Why: multi-site medical models are volumetric segmenters with BatchNorm3d. Their users wait for three
things besides a classifier's: the statistics pass (it must cost about one inference pass: the floor is
a plain ``torch.no_grad`` eval-mode forward over the same in-memory batches), the sliding window they
run inference with (its overhead over one forward of the whole volume), and the per-case scores (Dice,
IoU, HD95, ASD; HD95 and ASD need a distance transform per case and class) computed for every case and
strategy. Three parts, each timed in one run with its functions interleaved round by round:

(a) ``collect_stats`` of ``unet3d`` (10 BatchNorm3d layers) in batch mode (the C kernel on CPU, the
    eager float64 path as reference) and in sequential mode, vs the eval-mode forward on the same
    batches (throughput ratio = floor time / ours, goal >= 0.9), and vs that forward with BN buffers
    holding the data's statistics (what a trained model's forward sees);
(b) a sliding-window forward (constant weights, MONAI's default ``overlap=0.25``; written with torch
    here since MONAI is optional; MONAI's ``sliding_window_inference`` is timed too when importable)
    vs a plain forward of the whole volumes: the overhead ratio, next to the ratio of voxels the
    windows cover to the volume's (the part of the overhead that is the windows' extra work); and
    ``collect_stats`` through that window forward vs the window forward itself;
(c) ``CaseScorer`` (Dice, IoU, HD95, ASD per foreground class) per case vs the forward per case, on
    the untrained model's logits and on a realistic prediction (the ground truth shifted by one voxel
    per axis: non-empty structures with real boundaries, so HD95 runs its distance transforms).

Data: ``seg-sites-3d`` volumes (1 x S^3, 3 classes, 2 sites, generated). Model: ``unet3d(width=8)``,
untrained (BN buffers at their initial values, or set to the data's statistics for ``floor_pop``).
``--device cuda`` puts model and batches on the GPU and synchronizes after each timed call (then the
C kernel does not apply: batch mode takes the compiled/eager torch reduction, and CPU time means little).

Run: python benchmarks/bench_dense.py [--threads 1 2] [--size 40] [--batches 4] [--batch-size 2]
     [--repeats 5] [--roi 24] [--device cpu|cuda] [--parts a b c]
Printed: machine facts (nproc, CPU model, load average before/after, torch threads), the fastest and
median round of wall and process CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from _timing import PICKS, eval_floors, interleaved, pick

import shiftbn as sb
from shiftbn.bn import native
from shiftbn.evaluate.dense import CaseScorer
from shiftbn.studies.models import unet3d

GOAL = 0.9


def machine_facts(device: torch.device) -> str:
    """One line: CPU count and model, load average, torch version and threads, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"machine: {platform.machine()}, nproc {usable} (of {os.cpu_count()}), CPU {cpu}; load average {load}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s){gpu}")


def _starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis as MONAI places them: step roi * (1 - overlap), the last flush with the end."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


def window_slices(spatial: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    """Every window of ``roi`` (clipped to the volume) over ``spatial``, as index tuples of the spatial axes."""
    roi = tuple(min(r, s) for r, s in zip(roi, spatial, strict=True))
    grid = itertools.product(*(_starts(s, r, overlap) for s, r in zip(spatial, roi, strict=True)))
    return [tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True)) for start in grid]


def sliding_window(model: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], overlap: float = 0.25,
                   sw_batch_size: int = 4) -> torch.Tensor:
    """Sliding-window inference with constant weights (MONAI's ``mode="constant"``): the windows of every
    volume of ``x`` (B, C, *S) go through ``model`` ``sw_batch_size`` positions at a time; overlapping
    logits are averaged."""
    spatial, b = tuple(x.shape[2:]), x.shape[0]
    slices = window_slices(spatial, roi, overlap)
    out, count = None, torch.zeros((1, 1, *spatial), device=x.device, dtype=x.dtype)
    for i in range(0, len(slices), sw_batch_size):
        chunk = slices[i : i + sw_batch_size]
        y = model(torch.cat([x[(slice(None), slice(None), *sl)] for sl in chunk]))
        if out is None:
            out = torch.zeros((b, y.shape[1], *spatial), device=y.device, dtype=y.dtype)
        for j, sl in enumerate(chunk):
            out[(slice(None), slice(None), *sl)] += y[j * b : (j + 1) * b]
            count[(slice(None), slice(None), *sl)] += 1
    return out / count


def _timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict:
    """Warm-up once, then interleaved rounds; on CUDA each call ends with a synchronize."""
    if device.type == "cuda":
        fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    for fn in fns.values():
        fn()
    return interleaved(fns, repeats)


def _report(title: str, times: dict, repeats: int, rows: Callable[[dict[str, float]], list[str]]) -> None:
    print(f"-- {title}")
    for clock in ("wall", "cpu"):
        for stat, _ in PICKS:
            t = pick(times, clock, stat)
            print(f"   {clock} {stat} over {repeats} interleaved rounds:")
            for line in rows(t):
                print(f"     {line}")


def _summary(part: str, times: dict, figures: dict[str, Callable[[dict[str, float]], float]], notes: str = "") -> None:
    """One line per part for benchmarks/gpu.sh's table: each figure of the min and the median wall round."""
    t = {stat: pick(times, "wall", stat) for stat, _ in PICKS}
    body = ", ".join(f"{name} " + " / ".join(f"{fn(t[stat]):.3g}" for stat, _ in PICKS) for name, fn in figures.items())
    print(f"summary {part}, {torch.get_num_threads()} thread(s), wall min / median: {body}{notes}")


def part_stats(model, batches, repeats, device) -> None:
    xs = [b[0] for b in batches]

    floor, floor_pop = eval_floors(model, xs)

    fns = {"floor": floor, "floor_pop": floor_pop,
           "batch": lambda: sb.collect_stats(model, batches, mode="batch", progress=False),
           "batch_eager": lambda: sb.collect_stats(model, batches, mode="batch", progress=False,
                                                   options=sb.CollectOptions(fused=False)),
           "sequential": lambda: sb.collect_stats(model, batches, mode="sequential", progress=False)}
    times = _timed(fns, repeats, device)
    path = "C kernel" if device.type == "cpu" and native.available() else "torch reduction"

    def rows(t):
        out = [f"floor: eval-mode no_grad forward      {t['floor']:8.3f} s   (initial BN buffers)",
               f"floor_pop: same, population BN       {t['floor_pop']:8.3f} s   (buffers = the data's statistics)"]
        for k, what in (("batch", f"batch mode, default ({path})"), ("batch_eager", "batch mode, eager float64"),
                        ("sequential", "sequential mode")):
            goal = f"  (goal >= {GOAL})" if k == "batch" else ""
            out.append(f"collect_stats {what:28s} {t[k]:8.3f} s   throughput ratio {t['floor'] / t[k]:6.3f}  "
                       f"vs pop {t['floor_pop'] / t[k]:6.3f}  = {t[k] / t['floor']:5.2f} forwards{goal}")
        return out

    _report("(a) statistics of the 3-D U-Net vs its eval-mode forward", times, repeats, rows)
    _summary("a", times, {"stats/forward throughput": lambda t: t["floor"] / t["batch"],
                          "sequential (forwards)": lambda t: t["sequential"] / t["floor"]}, f" (goal >= {GOAL})")


def part_window(model, batches, roi, overlap, sw_batch, repeats, device) -> None:
    xs = [b[0] for b in batches]
    spatial = tuple(xs[0].shape[2:])
    roi = (roi,) * len(spatial)
    slices = window_slices(spatial, roi, overlap)
    covered = sum(math.prod(s.stop - s.start for s in sl) for sl in slices) / math.prod(spatial)
    with torch.no_grad():  # the window forward is the plain forward where one window covers the volume
        same = (sliding_window(model, xs[0], spatial, overlap) - model(xs[0])).abs().max().item()
    print(f"-- (b) sliding window: roi {roi}, overlap {overlap}, {len(slices)} windows per volume, sw_batch_size "
          f"{sw_batch}; windows cover {covered:.2f}x the volume's voxels; whole-volume window vs plain forward: "
          f"max |diff| {same:.1e}")

    def plain():
        with torch.no_grad():
            for x in xs:
                model(x)

    def ours():
        with torch.no_grad():
            for x in xs:
                sliding_window(model, x, roi, overlap, sw_batch)

    fns = {"plain": plain, "window": ours,
           "stats_window": lambda: sb.collect_stats(
               model, batches, mode="batch", progress=False,
               forward=lambda m, x: sliding_window(m, x, roi, overlap, sw_batch))}
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        print("   MONAI not importable here: only the torch windowing above is timed (pip install monai to add it)")
    else:
        def monai_window():
            with torch.no_grad():
                for x in xs:
                    sliding_window_inference(x, roi, sw_batch, model, overlap=overlap, mode="constant")

        fns["monai"] = monai_window
    times = _timed(fns, repeats, device)

    def rows(t):
        out = [f"plain forward of the whole volumes   {t['plain']:8.3f} s",
               f"sliding window (torch, this script)  {t['window']:8.3f} s   overhead ratio "
               f"{t['window'] / t['plain']:5.2f}  (voxel ratio {covered:.2f})"]
        if "monai" in t:
            out.append(f"MONAI sliding_window_inference       {t['monai']:8.3f} s   overhead ratio "
                       f"{t['monai'] / t['plain']:5.2f}")
        out.append(f"collect_stats through the window     {t['stats_window']:8.3f} s   throughput ratio vs the "
                   f"window forward {t['window'] / t['stats_window']:6.3f}")
        return out

    _report("(b) sliding-window forward vs a plain forward", times, repeats, rows)
    _summary("b", times, {"window/plain": lambda t: t["window"] / t["plain"],
                          "stats throughput through it": lambda t: t["window"] / t["stats_window"]},
             f" (windows cover {covered:.2f}x the voxels)")


def part_metrics(model, batches, targets, repeats, device) -> None:
    scorer = CaseScorer(3)
    xs = [b[0] for b in batches]
    n_cases = sum(len(x) for x in xs)
    with torch.no_grad():
        logits = [model(x) for x in xs]
    # a realistic prediction: the ground truth moved one voxel along every axis (boundaries to measure)
    good = [torch.nn.functional.one_hot(torch.roll(t["mask"], (1, 1, 1), (1, 2, 3)), 3).movedim(-1, 1).float()
            .to(device) for t in targets]
    for name, outs in (("untrained logits", logits), ("shifted ground truth", good)):
        empty = sum(int((o.argmax(1) == c).flatten(1).any(1).logical_not().sum()) for o in outs for c in (1, 2))
        print(f"   {name}: {empty} of {2 * n_cases} (case, class) predictions empty (scored without distances)")

    def forward():
        with torch.no_grad():
            for x in xs:
                model(x)

    def score(outs):
        def run():
            for o, t in zip(outs, targets, strict=True):
                scorer(o, t)
        return run

    fns = {"forward": forward, "score_untrained": score(logits), "score_shifted": score(good)}
    times = _timed(fns, repeats, device)

    def rows(t):
        per = {k: 1e3 * v / n_cases for k, v in t.items()}
        return [f"forward                              {per['forward']:8.1f} ms per case",
                f"CaseScorer, untrained logits         {per['score_untrained']:8.1f} ms per case   "
                f"= {t['score_untrained'] / t['forward']:5.3f} x the forward",
                f"CaseScorer, shifted ground truth     {per['score_shifted']:8.1f} ms per case   "
                f"= {t['score_shifted'] / t['forward']:5.3f} x the forward"]

    _report(f"(c) per-case metrics (Dice, IoU, HD95, ASD; 2 foreground classes) vs the forward, {n_cases} cases",
            times, repeats, rows)
    _summary("c", times, {"CaseScorer ms/case": lambda t: 1e3 * t["score_shifted"] / n_cases,
                          "x the forward": lambda t: t["score_shifted"] / t["forward"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, one run each")
    ap.add_argument("--size", type=int, default=40, help="volume side S in voxels (default 40)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--width", type=int, default=8, help="unet3d width (default 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--roi", type=int, default=24, help="sliding-window side (default 24)")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False here; run with --device cpu")
    n = args.batches * args.batch_size
    t0 = time.perf_counter()
    ds = sb.load("seg-sites-3d", n=math.ceil(n / 2), size=args.size, sites=2)
    items = [ds[i] for i in range(n)]
    print(f"data: {n} seg-sites-3d volumes 1x{args.size}^3 (generated in {time.perf_counter() - t0:.1f} s), "
          f"{args.batches} batches of {args.batch_size}, 2 sources; unet3d(width={args.width}); "
          f"{args.repeats} interleaved rounds; device {device}")
    batches, targets = [], []
    for k in range(args.batches):
        part = items[k * args.batch_size : (k + 1) * args.batch_size]
        x = torch.stack([it[0] for it in part]).to(device)
        batches.append((x, torch.zeros(len(part)), torch.full((len(part),), k % 2)))
        targets.append({"mask": torch.stack([it[1]["mask"] for it in part]),
                        "spacing": torch.stack([torch.as_tensor(it[1]["spacing"]) for it in part])})
    model = unet3d(in_channels=1, num_classes=3, width=args.width).eval().to(device)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n==== {threads} torch thread(s)\n{machine_facts(device)}")
        if "a" in args.parts:
            part_stats(model, batches, args.repeats, device)
        if "b" in args.parts:
            part_window(model, batches, args.roi, args.overlap, args.sw_batch_size, args.repeats, device)
        if "c" in args.parts:
            part_metrics(model, batches, targets, args.repeats, device)
        print(f"after: {machine_facts(device)}")


if __name__ == "__main__":
    main()
