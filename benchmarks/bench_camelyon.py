"""End to end on the generated Camelyon-shaped data: ``shiftbn matrix`` wall time, peak RSS, samples/s.

Why: the matrix at real scale is 100,000 PNG files of 96x96 in 5 hospitals read by a ResNet-18; this
times the command line a user runs, on 2 CPU cores (OMP_NUM_THREADS=2, ``--nice`` 10 by default). On a
shared machine the wall time depends on the others' load: the CPU time (user + sys) is printed too.
The weights are a randomly initialised ``resnet18(num_classes=2)`` (seed 0) saved to ``OUT/W.pt``:
untrained, so the accuracies are meaningless; the benchmark is about time and memory.
``--n N`` (< the manifest's rows) runs a subset: the first rows of each hospital in proportion to its
size (N in all), written next to the full manifest as ``manifest_first<N>.csv`` (paths stay
relative to the data folder), and prints the time extrapolated linearly to the full manifest.

Needs the data: python benchmarks/make_camelyon_like.py   (once, ~100k files under /tmp)
Run: python benchmarks/bench_camelyon.py [--data /tmp/shiftbn_data/camelyon_like] [--n 20000]
     [--strategies source target] [--out /tmp/shiftbn_bench/camelyon]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]


def _subset(manifest: Path, n: int) -> Path:
    """The first rows of each source, in proportion to its size, ``n`` rows in all (written once)."""
    df = pd.read_csv(manifest)
    if n >= len(df):
        return manifest
    counts = df["source"].value_counts(sort=False)
    take = (counts * n / len(df)).round().astype(int)
    take.iloc[0] += n - int(take.sum())
    part = pd.concat([df[df["source"] == s].head(int(k)) for s, k in take.items()])
    out = manifest.with_name(f"manifest_first{n}.csv")
    part.to_csv(out, index=False)
    return out


def _vmhwm_poll(pid: int, peak: list[int], done: threading.Event) -> None:
    """Peak resident set (kB) of ``pid`` read from /proc while it runs (when /usr/bin/time is absent)."""
    while not done.is_set():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
            peak[0] = max(peak[0], int(re.search(r"VmHWM:\s+(\d+)", text).group(1)))
        except (OSError, AttributeError):
            pass
        done.wait(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/shiftbn_data/camelyon_like"))
    ap.add_argument("--n", type=int, default=None, help="rows of the manifest to use (default: all)")
    ap.add_argument("--strategies", nargs="+", default=["ema", "target"])
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the run (default 2)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the run (default 10)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/shiftbn_bench/camelyon"))
    args = ap.parse_args()
    full = args.data / "manifest.csv"
    if not full.exists():
        sys.exit(f"{full} not found: generate it first with python benchmarks/make_camelyon_like.py")
    manifest = _subset(full, args.n) if args.n else full
    n_rows, n_full = len(pd.read_csv(manifest)), len(pd.read_csv(full))
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "W.pt"
    sys.path.insert(0, str(REPO))
    from benchmarks.camelyon_model import resnet18_2

    torch.save(resnet18_2().state_dict(), weights)
    matrix_out = args.out / f"matrix_{n_rows}"
    shutil.rmtree(matrix_out, ignore_errors=True)
    cli = [sys.executable, "-m", "shiftbn", "matrix", "--model", "benchmarks.camelyon_model:resnet18_2",
           "--weights", str(weights), "--data", str(manifest), "--strategies", *args.strategies,
           "--out", str(matrix_out), "--no-progress"]
    timer = shutil.which("time") and Path("/usr/bin/time").exists()
    cmd = ["nice", "-n", str(args.nice)] + (["/usr/bin/time", "-v"] if timer else []) + cli
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={args.threads}; {manifest} ({n_rows:,} of {n_full:,} rows)")
    print("command: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()
    if not timer:
        threading.Thread(target=_vmhwm_poll, args=(proc.pid, peak, done), daemon=True).start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    print(out)
    if proc.returncode:
        sys.exit(f"shiftbn matrix failed with exit status {proc.returncode}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out)
    rss_kb = int(m.group(1)) if m else peak[0]
    cpu = [float(v) for v in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", out)]
    load = os.getloadavg()
    # source+target: statistics over the calibration half, then the eval half twice (source, target).
    passes = 0.5 + 0.5 * len(set(args.strategies) & {"ema", "target", "precise"})
    print(f"wall {wall:.1f} s, peak RSS {rss_kb / 1024:.0f} MiB, {n_rows / wall:.1f} dataset samples/s "
          f"({passes * n_rows / wall:.1f} image forwards/s over {passes:g} passes-equivalent)"
          + (f"; CPU {sum(cpu):.0f} s (user + sys)" if cpu else "")
          + f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    if n_rows < n_full:
        print(f"extrapolated to all {n_full:,} rows (linear in samples): {wall * n_full / n_rows / 60:.1f} min wall"
              + (f", {sum(cpu) * n_full / n_rows / 60:.1f} min CPU" if cpu else ""))


if __name__ == "__main__":
    main()
