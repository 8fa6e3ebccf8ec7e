"""Cost of cross_source_matrix vs the forward passes it cannot avoid, done in a bare loop (prints ratios).

Why: the matrix must cost about the forward passes its strategies need, whatever the number of
sources S. For the strategies source, precise, target, prior:16:k=1, batch:64:k=1 and stats:* (one
grouping of the test samples each) those are:
one statistics pass over the calibration data (single-source batches of 64, every source), one
PreciseBN pass over it (mixed batches of 64), and one evaluation pass per distinct (statistics, eval
source) pair: S*S for stats:i on j (target shares stats:j on j) + S each for source, precise,
prior:16 and batch:64 (batches of 64), i.e. S*S + 4S passes over one source's evaluation samples.
The bare loop runs a plain eval-mode ``no_grad`` forward over the same number of samples in the same
batch sizes, on pre-stacked tensors. Target: <= 1.15. Wall and CPU time (1 torch thread), fastest and
median of interleaved rounds.

Data: ``--dataset synthetic`` (default): S sources of ``--per-source`` 3x32x32 images (a per-source
offset and scale, 10 classes) held in memory, half calibration, half evaluation; or a built-in
dataset name (e.g. digits-labs). Model: SmallCNN (width 16), untrained.

``--device cuda``: the model on the GPU (the matrix moves each batch there; the bare loop's tensors are
there already, so the ratio includes the matrix's host-to-device copies), each timed call synchronized.

Run: python benchmarks/bench_matrix.py [--sources 5 20] [--per-source 300] [--repeats 3] [--threads 1]
     [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import PICKS, interleaved, pick
from torch.utils.data import TensorDataset

import shiftbn as sb
from shiftbn._torch import stack_inputs
from shiftbn.evaluate import cross_source_matrix
from shiftbn.studies.models import SmallCNN

STRATEGIES = ["ema", "precise", "target", "prior:16:k=1", "batch:64:k=1", "stats:*"]


def synthetic(n_sources: int, per_source: int, seed: int = 0) -> sb.SourceTaggedDataset:
    """``n_sources`` sources of ``per_source`` 3x32x32 images each, shifted and scaled per source."""
    g = torch.Generator().manual_seed(seed)
    n = n_sources * per_source
    src = torch.arange(n) % n_sources
    x = torch.randn(n, 3, 32, 32, generator=g) * (1 + 0.1 * src.view(-1, 1, 1, 1)) + 0.2 * src.view(-1, 1, 1, 1)
    y = torch.randint(0, 10, (n,), generator=g)
    return sb.SourceTaggedDataset(TensorDataset(x, y), [f"s{int(s):02d}" for s in src])


def run(ds: sb.SourceTaggedDataset, repeats: int, width: int, device: torch.device | str = "cpu") -> None:
    device = torch.device(device)
    model = SmallCNN(in_channels=ds[0][0].shape[0], width=width).eval().to(device)
    sources = ds.sources_present
    s = len(sources)
    split = ds.split(fractions=(0.0, 0.5, 0.5), seed=0)
    cal = stack_inputs(split.calibration).to(device)
    cal_parts = [stack_inputs(split.calibration.subset(k)).to(device) for k in sources]
    ev = {k: stack_inputs(split.test.subset(k)).to(device) for k in sources}
    n_eval = s * s + 4 * s
    print(f"-- {s} sources, {len(ds):,} samples ({len(cal):,} calibration); SmallCNN width {width}; unavoidable: "
          f"2 statistics passes over the calibration data + {n_eval} evaluation passes (S*S + 4S)")

    @torch.no_grad()
    def bare():
        model.eval()
        for x in cal_parts:  # statistics pass, single-source batches of 64
            for i in range(0, len(x), 64):
                model(x[i : i + 64])
        for i in range(0, len(cal), 64):  # PreciseBN pass, mixed batches of 64
            model(cal[i : i + 64])
        for _ in range(s + 2):  # stats:* (incl. target), source, precise: batches of 256
            for x in ev.values():
                for i in range(0, len(x), 256):
                    model(x[i : i + 256])
        for _ in range(2):  # prior:16 (per test batch of 64) and batch:64
            for x in ev.values():
                for i in range(0, len(x), 64):
                    model(x[i : i + 64])

    def matrix():
        cross_source_matrix(model, ds, STRATEGIES, metrics=["accuracy"], calibration=split, progress=False)

    fns = {"bare": bare, "matrix": matrix}
    if device.type == "cuda":
        fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats)
    for clock in ("wall", "cpu"):
        for stat, _ in PICKS:
            t = pick(times, clock, stat)
            print(f"{clock} {stat:6s} over {repeats} interleaved rounds: bare {t['bare']:7.3f} s, "
                  f"cross_source_matrix {t['matrix']:7.3f} s, ratio {t['matrix'] / t['bare']:5.3f}  (target <= 1.15)")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--sources", type=int, nargs="+", default=[5, 20], help="S values (synthetic data)")
    ap.add_argument("--per-source", type=int, default=300, help="samples per source (synthetic data)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core VM two threads make timings vary by +-40%%)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here; run with --device cpu")
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
          f"strategies {' '.join(STRATEGIES)}; device "
          + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    if args.dataset != "synthetic":
        run(sb.load(args.dataset), args.repeats, args.width, device)
        return
    for s in args.sources:
        run(synthetic(s, args.per_source), args.repeats, args.width, device)


if __name__ == "__main__":
    main()
