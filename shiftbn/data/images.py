"""Image files as tensors: ``load_image`` and the lazy ``FileDataset``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def load_image(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """Decode one image file into a float32 tensor (C, H, W) in [0, 1].

    ``channels``: 1 converts to grayscale, 3 to RGB (Pillow's conversions; a 16-bit or float
    grayscale file is repeated into three channels); ``None`` keeps one channel for grayscale files
    and three for colour ones.
    Bit depth: 8-bit files (and every colour file: Pillow reads 16-bit colour PNGs as 8-bit) are
    divided by 255; 16-bit grayscale files (Pillow mode ``I;16``, X-ray/CT exports) by 65535, so a
    12-bit range stored in 16 bits lands in [0, 0.0625]; 32-bit float files (mode ``F``) are used as
    stored when every value lies in [0, 1] and refused otherwise; 32-bit integer files (mode ``I``,
    other than a 16-bit PNG) are refused, as their range is unknown.
    Why: a missing, empty, truncated or non-image file must name itself, not surface as PIL's traceback;
    Pillow's own 8-bit conversion of 16-bit and float images clips them to white or black.

    Args:
        path: the image file (any format Pillow reads).
        channels: 1 (grayscale), 3 (RGB) or ``None`` (default: as the file is).

    Returns:
        A float32 tensor (C, H, W) with values in [0, 1].

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be decoded as an image, or its values cannot be mapped to [0, 1];
            the message names it.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     f = pathlib.Path(tmp) / "a.png"
        ...     Image.new("RGB", (5, 4), (255, 0, 0)).save(f)
        ...     img = load_image(f)
        >>> tuple(img.shape), img[0].max().item()
        ((3, 4, 5), 1.0)
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as im:
            mode, fmt = im.mode, im.format
            deep = mode.startswith("I") or mode == "F"  # 16/32-bit grayscale: Pillow's "L" clips it
            gray = mode in ("1", "L") if channels is None else channels == 1
            arr = np.asarray(im) if deep else np.asarray(im.convert("L" if gray else "RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}; fix its path or remove it from the manifest") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError (not an image, 0 bytes) and "image file is truncated" are OSErrors
        raise ValueError(f"cannot decode image {path}: {e}; remove it from the manifest/folder") from e
    if deep:
        t = torch.from_numpy(_deep_gray(path, arr, mode, fmt))
        return t.expand(3, -1, -1).contiguous() if channels == 3 else t
    t = torch.from_numpy(arr.astype(np.float32) / 255.0)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _deep_gray(path: str | Path, arr: np.ndarray, mode: str, fmt: str | None) -> np.ndarray:
    """A 16-bit or 32-bit grayscale image (Pillow modes ``I;16*``, ``I``, ``F``) as float32 (1, H, W) in [0, 1].

    Why: Pillow's conversion to 8 bits clips these at 255 (16-bit X-ray/CT exports came out all white);
    a range that cannot be known is refused rather than guessed.
    """
    if arr.ndim != 2:
        raise ValueError(f"image values of {path} (mode {mode}, shape {arr.shape}) are not one grayscale plane; "
                         "convert the file to an 8- or 16-bit PNG")
    if (arr.dtype.kind == "u" and arr.dtype.itemsize == 2) or (mode == "I" and fmt == "PNG"):  # PNG: <= 16 bits
        out = arr.astype(np.float64) / 65535.0
    elif mode == "F":
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(f"image values of {path} (32-bit float) include {int((~finite).sum())} NaN/inf; float "
                             "images are used as stored and must lie in [0, 1]; fix or remove the file")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise ValueError(f"image values of {path} (32-bit float) span [{lo:g}, {hi:g}]; float images are used as "
                             "stored and must lie in [0, 1]: rescale the file to [0, 1] (e.g. divide by its "
                             "maximum) or save it as a 16-bit PNG")
        out = arr
    else:
        raise ValueError(f"image values of {path} are {arr.dtype} integers (Pillow mode {mode}) whose range is not "
                         "known, so they are not mapped to [0, 1] by guess; save the file as an 8- or 16-bit "
                         "unsigned PNG/TIFF or as 32-bit float in [0, 1]")
    return out.astype(np.float32)[None]


class FileDataset(Dataset):
    """Items are ``(loader(path), label)``; files are decoded lazily, one per ``__getitem__``.

    Why: batches need one image size; a file that differs is named here instead of failing later
    in ``torch.stack`` without a name. The first tensor item's shape is recorded (per process) and
    every later tensor item is compared with it (``check_shapes=False`` for variable-size loaders).

    Args:
        paths: one file path per sample (N).
        labels: (N,) class ids, stored as ``targets`` (int64).
        loader: ``loader(path)`` -> the input (default ``load_image``).
        check_shapes: compare every tensor item's shape with the first one's (default True).

    Returns:
        A map-style ``FileDataset`` whose item ``i`` is ``(loader(paths[i]), int(targets[i]))``.

    Raises:
        ValueError: (on reading) an item whose shape differs from the first item's; names both files.

    Example:
        >>> data = FileDataset(["a.png", "b.png"], [0, 1], loader=lambda p: torch.zeros(1, 2, 2))
        >>> len(data), data[1][1], data.targets.tolist()
        (2, 1, [0, 1])
    """

    def __init__(
        self,
        paths: list[str],
        labels: np.ndarray,
        loader: Callable[[str], Any] = load_image,
        *,
        check_shapes: bool = True,
    ) -> None:
        self.paths = paths
        self.targets = np.asarray(labels, dtype=np.int64)
        self.loader = loader
        self.check_shapes = check_shapes
        self._first: tuple[str, tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x = self.loader(self.paths[i])
        if self.check_shapes and isinstance(x, torch.Tensor):
            self._check_shape(self.paths[i], tuple(x.shape))
        return x, int(self.targets[i])

    def _check_shape(self, path: str, shape: tuple[int, ...]) -> None:
        if self._first is None:
            self._first = (path, shape)
        elif shape != self._first[1]:
            first_path, first_shape = self._first
            what = "channels" if shape[1:] == first_shape[1:] and len(shape) == 3 else "size"
            raise ValueError(
                f"image {path} has shape {shape} (C, H, W) but {first_path} has {first_shape}: images in one "
                f"dataset need one {what}; resize them (CLI: --image-size), convert them to one colour mode, or "
                "pass a loader that does"
            )
