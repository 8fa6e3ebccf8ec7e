"""Generate a Camelyon17-shaped patch dataset without downloading anything (prints wall time, files/s).

Why: loaders, samplers and BN statistics need hundreds of thousands of files from several hospitals
to be measured at scale; WILDS Camelyon17 is 10 GB behind a download. Here each patch is H&E-like
tissue (Beer-Lambert mix of a haematoxylin and an eosin stain): nuclei are Gaussian blobs, denser,
larger and darker for ``tumor`` than ``normal``. Each hospital has its own stain vectors, stain
strength, gamma, brightness and scanner blur, so the hospital is a real domain shift.

One PNG per patch, ``OUT/patches/hospital_<h>/patch_<i>.png``, hard-linked (symlinked where hard
links fail) into the two other layouts, so the disk holds each image once:

- ``OUT/manifest.csv`` (path, label, source) -> ``shiftbn.data.from_frame("OUT/manifest.csv")``
- ``OUT/metadata.csv`` + ``OUT/patches/patient_XXX_node_N/...`` (WILDS) -> ``shiftbn.data.camelyon17("OUT")``
- ``OUT/folder/center_<h>/{normal,tumor}/patch_<i>.png`` -> ``shiftbn.data.from_folder("OUT/folder")``

Sources are ``center_<h>`` and labels 0 = normal, 1 = tumor in all three. ``OUT/params.json`` marks a
finished run: the same parameters again do nothing; an interrupted run resumes. The output lives
under /tmp by default, outside the repository.

Run: python benchmarks/make_camelyon_like.py [--out DIR] [--n 100000] [--size 96] [--hospitals 5]
     [--seed 0] [--workers 2] [--force] [--verify]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_OUT = "/tmp/shiftbn_data/camelyon_like"
CLASSES = ("normal", "tumor")
SLIDES_PER_HOSPITAL = 10  # WILDS Camelyon17: 50 slides, 10 per hospital
# Ruifrok & Johnston optical-density vectors (R, G, B) of haematoxylin and eosin.
_H = np.array([0.650, 0.704, 0.286])
_E = np.array([0.072, 0.990, 0.105])
_GENERATED = ("patches", "folder", "manifest.csv", "metadata.csv", "params.json", "params.partial.json")


def _hospital_styles(hospitals: int, seed: int) -> list[dict]:
    """Per-hospital stain/scanner parameters (the domain shift), drawn once from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    styles = []
    for _ in range(hospitals):
        h = _H + rng.normal(0, 0.08, 3)
        e = _E + rng.normal(0, 0.08, 3)
        styles.append({
            "h": (np.abs(h) / np.linalg.norm(h)).tolist(),
            "e": (np.abs(e) / np.linalg.norm(e)).tolist(),
            "h_strength": float(rng.uniform(0.7, 1.3)),
            "e_strength": float(rng.uniform(0.6, 1.4)),
            "gamma": float(rng.uniform(0.8, 1.25)),
            "brightness": float(rng.uniform(-0.06, 0.06)),
            "blur": float(rng.uniform(0.0, 1.2)),
        })
    return styles


def _plan(n: int, hospitals: int, size: int, seed: int) -> pd.DataFrame:
    """One row per patch: hospital, label and WILDS metadata (patient, node, coordinates, slide, split)."""
    rng = np.random.default_rng([seed, 0])
    # Unequal hospital sizes, as in the real data.
    weights = rng.lognormal(0.0, 0.35, hospitals)
    center = np.sort(rng.choice(hospitals, size=n, p=weights / weights.sum()))
    tumor = rng.integers(0, 2, n)
    slide_in_h = rng.integers(0, SLIDES_PER_HOSPITAL, n)
    slide = center * SLIDES_PER_HOSPITAL + slide_in_h
    # WILDS: patients 0..199 with nodes 0..4; one (patient, node) slide each, patients grouped by hospital.
    patient = center * 20 + slide_in_h * 2
    node = slide_in_h % 5
    i = np.arange(n)
    # Coordinates unique per patch (so unique per slide), on a patch-size grid like WILDS's.
    x_coord, y_coord = (i % 1024) * size, (i // 1024) * size
    # split 1 = in-distribution validation (10 %), as WILDS marks it; 0 = train.
    split = (rng.random(n) < 0.1).astype(np.int64)
    return pd.DataFrame({"patient": patient, "node": node, "x_coord": x_coord, "y_coord": y_coord,
                         "tumor": tumor, "slide": slide, "center": center, "split": split})


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of (H, W) or (H, W, C) by a multiplication in Fourier space (periodic borders)."""
    if sigma <= 0:
        return img
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    if img.ndim == 3:
        g = g[..., None]
    return np.fft.irfft2(np.fft.rfft2(img, axes=(0, 1)) * g, s=img.shape[:2], axes=(0, 1))


def _patch(index: int, tumor: int, style: dict, size: int, seed: int) -> np.ndarray:
    """One (size, size, 3) uint8 H&E-like patch; the same (index, seed) always gives the same pixels."""
    rng = np.random.default_rng([seed, 2, index])
    area = (size / 96) ** 2
    n_nuclei = rng.poisson((55 if tumor else 30) * area)
    radius = 2.3 if tumor else 1.8
    impulses = np.zeros((size, size))
    ys, xs = rng.integers(0, size, (2, n_nuclei))
    np.add.at(impulses, (ys, xs), rng.uniform(0.6, 1.4 if tumor else 1.0, n_nuclei))
    nuclei = _blur(impulses, radius) * (2 * np.pi * radius**2)
    nuclei = np.clip(nuclei, 0, 1.6) * (1.1 if tumor else 0.9)
    # Stroma: smooth low-frequency eosin density with some fibre-like noise.
    stroma = 0.35 + 0.25 * _blur(rng.normal(0, 1, (size, size)), 6.0) * 6 + 0.05 * rng.normal(0, 1, (size, size))
    stroma = np.clip(stroma, 0.05, 1.0)
    od = (style["h_strength"] * nuclei[..., None] * np.array(style["h"])
          + style["e_strength"] * stroma[..., None] * np.array(style["e"]))
    rgb = np.exp(-od)
    rgb = _blur(rgb, style["blur"])
    rgb = np.clip(rgb, 0, 1) ** style["gamma"] + style["brightness"] + rng.normal(0, 0.012, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def _wilds_name(p: int, n: int, x: int, y: int) -> str:
    return f"patient_{p:03d}_node_{n}/patch_patient_{p:03d}_node_{n}_x_{x}_y_{y}.png"


def _link(target: Path, link: Path) -> None:
    if link.exists() or link.is_symlink():
        return
    try:
        os.link(target, link)
    except FileExistsError:  # made meanwhile by another run on the same folder: same content
        pass
    except OSError:  # file systems without hard links
        with contextlib.suppress(FileExistsError):
            os.symlink(os.path.relpath(target, link.parent), link)


def _work(job: tuple) -> int:
    """Write one chunk of patches and their links; skips finished files so a run can resume."""
    from PIL import Image

    out, rows, styles, size, seed = job
    out = Path(out)
    done = 0
    for index, rel, wilds, folder, tumor, center in rows:
        target = out / rel
        if not target.exists():
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            Image.fromarray(_patch(index, tumor, styles[center], size, seed)).save(tmp, format="PNG",
                                                                                  compress_level=1)
            os.replace(tmp, target)  # atomic: an interrupted run never leaves half a PNG
        _link(target, out / wilds)
        _link(target, out / folder)
        done += 1
    return done


def generate(out: Path, n: int, size: int, hospitals: int, seed: int, workers: int) -> None:
    """Write the dataset under ``out`` (see the module docstring); ``params.json`` is written last."""
    styles = _hospital_styles(hospitals, seed)
    meta = _plan(n, hospitals, size, seed)
    width = max(6, len(str(n - 1)))
    names = [f"patch_{i:0{width}d}.png" for i in range(n)]
    rel = [f"patches/hospital_{c}/{f}" for c, f in zip(meta["center"], names, strict=True)]
    coords = meta[["patient", "node", "x_coord", "y_coord"]].itertuples(index=False)
    wilds = ["patches/" + _wilds_name(*r) for r in coords]
    folder = [f"folder/center_{c}/{CLASSES[t]}/{f}"
              for c, t, f in zip(meta["center"], meta["tumor"], names, strict=True)]
    for d in {str(Path(p).parent) for p in (*set(rel), *wilds, *folder)}:
        (out / d).mkdir(parents=True, exist_ok=True)
    rows = list(zip(range(n), rel, wilds, folder, meta["tumor"].tolist(), meta["center"].tolist(), strict=True))
    chunk = 250
    jobs = [(str(out), rows[i:i + chunk], styles, size, seed) for i in range(0, n, chunk)]
    t0, written = time.perf_counter(), 0
    with Pool(workers) as pool:
        for k, done in enumerate(pool.imap_unordered(_work, jobs), 1):
            written += done
            if k % max(1, len(jobs) // 20) == 0 or k == len(jobs):
                dt = time.perf_counter() - t0
                print(f"  {written:,}/{n:,} patches  {dt:6.1f} s  {written / dt:,.0f} files/s", flush=True)
    pd.DataFrame({"path": rel, "label": meta["tumor"], "source": [f"center_{c}" for c in meta["center"]]}).to_csv(
        out / "manifest.csv", index=False)
    meta.to_csv(out / "metadata.csv")  # WILDS writes an unnamed index column first
    (out / "styles.json").write_text(json.dumps(styles, indent=1))


def verify(out: Path, samples: int = 20) -> None:
    """Load the three layouts with shiftbn and check they hold the same patches, labels and sources."""
    import torch

    from shiftbn.data import camelyon17, from_folder, from_frame

    t0 = time.perf_counter()
    a, b, c = from_frame(out / "manifest.csv"), camelyon17(out), from_folder(out / "folder")
    print(f"loaded 3 layouts in {time.perf_counter() - t0:.1f} s: {len(a):,} / {len(b):,} / {len(c):,} items")
    if not len(a) == len(b) == len(c):
        raise SystemExit("layouts differ in size")
    def keys(ds) -> list[tuple[str, int]]:
        return [(ds.source_names[s], int(y)) for s, y in zip(ds.source_ids, ds.labels, strict=True)]

    # The manifest and metadata share row order; the folder is sorted, so match it by file name.
    key_a = keys(a)
    if key_a != keys(b):
        raise SystemExit("manifest and metadata disagree on sources/labels")
    in_folder = {Path(p).name: j for j, p in enumerate(c.base.paths)}
    key_c = keys(c)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(a), size=min(samples, len(a)), replace=False).tolist():
        j = in_folder[Path(a.base.paths[i]).name]
        if key_c[j] != key_a[i]:
            raise SystemExit(f"item {i}: folder says {key_c[j]}, manifest says {key_a[i]}")
        if not (torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][0], c[j][0])):
            raise SystemExit(f"item {i} has different pixels in the three layouts")
    if sorted(key_a) != sorted(key_c):
        raise SystemExit("folder layout disagrees with the manifest on sources/labels")
    print(f"verify ok: same sources, labels and pixels in all three layouts ({samples} items compared)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--hospitals", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="delete a previous dataset with other parameters")
    ap.add_argument("--verify", action="store_true", help="afterwards, load the three layouts and compare them")
    args = ap.parse_args()
    for name in ("n", "size", "hospitals", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    params = {"n": args.n, "size": args.size, "hospitals": args.hospitals, "seed": args.seed, "version": 1}
    final, partial = out / "params.json", out / "params.partial.json"
    for marker in (final, partial):
        if marker.exists() and json.loads(marker.read_text()) != params:
            if not args.force:
                raise SystemExit(f"{out} holds a dataset with other parameters ({marker.read_text().strip()}); "
                                 "pass --force to replace it or choose another --out")
            for name in _GENERATED + ("styles.json",):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if final.exists():
        print(f"{out} is up to date ({json.dumps(params)}); nothing to do")
    else:
        out.mkdir(parents=True, exist_ok=True)
        resumed = partial.exists()
        partial.write_text(json.dumps(params))
        print(f"writing {args.n:,} patches of {args.size}x{args.size} from {args.hospitals} hospitals to {out} "
              f"with {args.workers} workers{' (resuming)' if resumed else ''}")
        t0 = time.perf_counter()
        generate(out, args.n, args.size, args.hospitals, args.seed, args.workers)
        dt = time.perf_counter() - t0
        os.replace(partial, final)
        print(f"done: {args.n:,} patches in {dt:.1f} s wall, {args.n / dt:,.0f} files/s")
    if args.verify:
        verify(out)


if __name__ == "__main__":
    main()
