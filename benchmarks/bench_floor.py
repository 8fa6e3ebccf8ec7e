"""``shiftbn matrix`` (and ``report``) vs its floor, interleaved: the whole job a user waits for (prints ratios).

Why: users wait for the command, not for one pass. The floor (issue 25) is what no implementation can
avoid: start-up (Python, torch, shiftbn, the model and the file list) + one decode pass of every file +
the forwards the strategies need (one eval-mode pass per strategy, statistics source and grouping over
the evaluation samples, plus the two statistics passes over the calibration samples: one per source,
one PreciseBN pass in mixed batches) done as plain ``no_grad`` eval forwards on tensors decoded
beforehand. The command runs as a subprocess (``python -m shiftbn matrix``, start-up included, its
CPU time from ``RUSAGE_CHILDREN``); the floor's start-up is a subprocess that imports what the command
imports, loads the model and lists the files; its decode pass and forwards run in this process. Rounds
alternate command and floor; min and median of rounds, wall and CPU (user + sys) time.

Memory policy: the ``shiftbn`` command keeps freed memory in glibc's heap (``shiftbn/cli/_malloc.py``);
this process applies the same policy before timing the floor, so the floor does not pay the page faults
of fresh ``mmap`` blocks that the command avoids (in a fresh process without it, the floor's forwards on
96x96 batches took 1.9x the CPU, half of it system time). ``--floor-only`` times the floor alone.

Data: ``--png``: N RGB 64x64 PNGs over 4 sites, 2 classes (``/tmp/shiftbn_data/png_floor``, made once);
``--camelyon N``: the first N rows of the Camelyon-shaped set (``make_camelyon_like.py``, 96x96).
Model: ``SmallCNN(in_channels=3, num_classes=2)`` (three conv-BN-ReLU blocks; weights random, seed 0).
``--device cuda``: the command runs with ``--device cuda`` and the floor's forwards run there too (each
batch moved to the device as the command moves it, synchronized before the clock stops); read the wall
figures then: CPU time is the host's share.

Run: python benchmarks/bench_floor.py [--png 2000] [--camelyon 20000] [--sizes 2 5 7] [--repeats 3]
     [--threads 1] [--report] [--uncached] [--floor-only] [--device cpu|cuda] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = Path("/tmp/shiftbn_bench/floor")
STRATEGIES = {2: ["ema", "target"],
              5: ["ema", "target", "precise", "prior:16", "batch:64"],
              7: ["ema", "target", "precise", "prior:16", "batch:64", "prior:64:32", "batch:32"]}
MODEL = ["--model", "shiftbn.studies.models:SmallCNN", "--model-kwargs", "in_channels=3", "num_classes=2"]


def png_folder(n: int) -> Path:
    """``n`` RGB 64x64 PNGs over 4 sites and 2 classes (a per-site brightness shift), made once."""
    root = Path(f"/tmp/shiftbn_data/png_floor_{n}")
    done = root.with_name(root.name + ".done")
    if done.exists():
        return root
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        site, cls = i % 4, (i // 4) % 2
        d = root / f"site{site}" / f"c{cls}"
        d.mkdir(parents=True, exist_ok=True)
        img = rng.normal(0.4 + 0.1 * site + 0.1 * cls, 0.2, (64, 64, 3)).clip(0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i:06d}.png")
    done.write_text("")
    return root


def camelyon(n: int) -> Path:
    """The first ``n`` rows of the Camelyon-shaped manifest (``make_camelyon_like.py`` must have run)."""
    full = Path("/tmp/shiftbn_data/camelyon_like/manifest.csv")
    if not full.exists():
        sys.exit(f"{full} not found: python benchmarks/make_camelyon_like.py --n {n} first")
    from benchmarks.bench_camelyon import _subset

    return _subset(full, n)


def passes(strategies: list[str], groupings: int = 5) -> tuple[list[int], int]:
    """The floor's evaluation passes (their batch sizes, one entry per pass over all evaluation samples)
    and its statistics passes over the calibration samples, for ``strategies``."""
    from shiftbn.adapt import BatchStats, Prior, parse_strategy

    evals, stats = [], set()
    for spec in strategies:
        st = parse_strategy(spec)
        if isinstance(st, (BatchStats, Prior)) and getattr(st, "samples", None) is None:
            evals += [st.batch] * groupings
        else:
            evals.append(256)
        if spec in ("target", "stats:*"):
            stats.add("source")
        if spec == "precise":
            stats.add("precise")
    return evals, len(stats)


def run_child(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def floor(data: Path, weights: Path, strategies: list[str], env: dict, threads: int,
          device: str = "cpu") -> tuple[float, float]:
    """Start-up (a subprocess) + one decode pass + the unavoidable forwards on preloaded tensors."""
    startup = ("import torch, shiftbn.cli.main, shiftbn.evaluate, shiftbn.adapt; "
               "from shiftbn.cli import _user; from shiftbn.studies.models import SmallCNN; "
               f"m = SmallCNN(in_channels=3, num_classes=2); m.load_state_dict(torch.load({str(weights)!r})); "
               f"ds = _user.load_data(_user.argparse.Namespace(data=__import__('pathlib').Path({str(data)!r}), "
               "normalize=None, transform=None, channels=None, image_size=None, batch_size=64, path_col='path', "
               "label_col='label', source_col='source', allow_outside=False, strict=False)); "
               f"torch.zeros(1, device={device!r})")  # the command starts the device's runtime (CUDA) too
    wall0, cpu0 = run_child([sys.executable, "-c", startup], env)
    from shiftbn.cli import _user
    from shiftbn.studies.models import SmallCNN

    torch.set_num_threads(threads)
    c0, t0 = time.process_time(), time.perf_counter()
    model = SmallCNN(in_channels=3, num_classes=2)
    model.load_state_dict(torch.load(weights))
    model.to(device).eval()
    ds = _user.load_data(argparse.Namespace(data=data, normalize=None, transform=None, channels=None,
                                            image_size=None, batch_size=64, path_col="path", label_col="label",
                                            source_col="source", allow_outside=False, strict=False))
    x = torch.stack([ds.base[i][0] for i in range(len(ds))])  # the one decode pass
    half = len(x) // 2  # calibration and evaluation halves, as --calibration 0.5
    cal, ev = x[:half], x[half:]
    evals, n_stats = passes(strategies)
    with torch.no_grad():
        for _ in range(n_stats):
            for i in range(0, len(cal), 64):
                model(cal[i:i + 64].to(device))
        for b in evals:
            for i in range(0, len(ev), b):
                model(ev[i:i + b].to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return wall0 + time.perf_counter() - t0, cpu0 + time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", type=int, default=2000, help="PNG files of the folder (0: skip)")
    ap.add_argument("--camelyon", type=int, default=0, help="rows of the Camelyon-shaped set (0: skip)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[2, 5, 7], choices=sorted(STRATEGIES),
                    help="matrix runs by strategy count (none with --report: the report alone)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="time shiftbn report (S = 5) too")
    ap.add_argument("--uncached", action="store_true", help="also time matrix with --cache-mb 0 --cache-disk-mb 0")
    ap.add_argument("--floor-only", action="store_true", help="time the floor alone (to check a floor)")
    ap.add_argument("--device", default="cpu", help="where the command and the floor run (cpu, cuda)")
    ap.add_argument("--work", type=Path, default=WORK,
                    help=f"folder for the weights and the run folders; one per concurrent run (default: {WORK})")
    args = ap.parse_args()
    if not args.sizes and not args.report:
        ap.error("--sizes with no value times nothing: give sizes (2 5 7) or add --report")
    from shiftbn.cli._malloc import keep_freed_memory

    kept = keep_freed_memory()  # the command's memory policy, for the floor timed in this process
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "W.pt"
    from shiftbn.studies.models import SmallCNN

    torch.save(SmallCNN(in_channels=3, num_classes=2).state_dict(), weights)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO)}
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    print(f"machine: {platform.machine()} {cpu}, nproc {os.cpu_count()}, {args.threads} torch thread(s) "
          f"(--threads, OMP_NUM_THREADS), torch {torch.__version__}; load at start {os.getloadavg()[0]:.1f}; "
          f"{args.repeats} interleaved rounds; freed memory kept for the floor: {kept}; device {args.device}")
    sets = ([("png", png_folder(args.png), args.png)] if args.png else []) + \
        ([("camelyon", camelyon(args.camelyon), args.camelyon)] if args.camelyon else [])
    rows = []
    for name, data, n in sets:
        jobs = [("matrix", s) for s in args.sizes] + ([("report", 5)] if args.report else [])
        for verb, s in jobs:
            out = work / f"{verb}_{name}_{s}"
            cmd = [sys.executable, "-m", "shiftbn", verb, *MODEL, "--weights", str(weights), "--data", str(data),
                   "--strategies", *STRATEGIES[s], "--threads", str(args.threads), "--no-ci", "--no-progress",
                   "--quiet", "--device", args.device, "--out", str(out)]
            fns = {"command": lambda cmd=cmd: run_child(cmd, env),
                   "floor": lambda s=s, data=data: floor(data, weights, STRATEGIES[s], env, args.threads,
                                                                         args.device)}
            if args.floor_only:
                fns["command"] = lambda: (float("nan"), float("nan"))
            if args.uncached and verb == "matrix":
                fns["uncached"] = lambda cmd=cmd: run_child([*cmd, "--cache-mb", "0", "--cache-disk-mb", "0"], env)
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    times[k].append(fn())
            shutil.rmtree(out, ignore_errors=True)
            for clock, j in (("wall", 0), ("cpu", 1)):
                for stat, f in (("min", min), ("median", statistics.median)):
                    v = {k: f(t[j] for t in ts) for k, ts in times.items()}
                    rows.append((f"{name} {n}", verb, s, clock, stat, v))
            print(f"done {name} {verb} S={s}; load {os.getloadavg()[0]:.1f}", flush=True)
            _table(rows[-4:])
    print("\nall:")
    _table(rows)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


def _table(rows: list) -> None:
    print(f"{'data':14s} {'verb':7s} {'S':>2s} {'clock':5s} {'stat':6s} {'command s':>10s} {'floor s':>8s} "
          f"{'ratio':>6s} {'uncached s':>11s}")
    for data, verb, s, clock, stat, v in rows:
        unc = f"{v['uncached']:11.1f}" if "uncached" in v else ""
        print(f"{data:14s} {verb:7s} {s:2d} {clock:5s} {stat:6s} {v['command']:10.1f} {v['floor']:8.1f} "
              f"{v['command'] / v['floor']:6.2f} {unc}", flush=True)


if __name__ == "__main__":
    main()
