"""Image pipelines that survive real folders: colour mode, size and normalization fixed per dataset,
and unreadable files found before a pass starts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from shiftbn.data.images import load_image


def _floats(name: str, values: float | Sequence[float] | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    vals = (values,) if isinstance(values, (int, float)) else tuple(values)
    if not vals or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite numbers, one per channel or one for all, got {values!r}")
    return tuple(float(v) for v in vals)


@dataclass(frozen=True)
class ImageLoader:
    """Decode one image file into a float32 tensor (C, H, W): ``channels`` (1 = grayscale, 3 = RGB,
    ``None`` = as stored), resized to ``size`` (pixels, square, bilinear), passed through
    ``transform`` and normalized as (x - mean) / std per channel (values in [0, 1] before the
    transform; ImageNet models: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)).

    Why: one grayscale file among RGB ones, or one odd size, must not break a batch; models
    trained with a normalization need the same one here. Picklable, so DataLoader workers can use it
    (when ``transform`` is: a module-level function or a transform object, not a closure).

    ``transform``: a callable on one (C, H, W) float tensor returning a tensor or array (e.g. a
    MONAI array transform such as ``ScaleIntensity()``); it runs after ``channels`` and ``size``
    and before ``mean``/``std``; its result is made a float32 tensor.
    """

    channels: int | None = None
    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    transform: Callable | None = None

    def __post_init__(self) -> None:
        if self.transform is not None and not callable(self.transform):
            raise TypeError(f"transform must be a callable on one image tensor, got {type(self.transform).__name__}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None, got {self.channels!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"size must be a positive number of pixels, got {self.size!r}")
        mean, std = _floats("mean", self.mean), _floats("std", self.std)
        if (mean is None) != (std is None):
            raise ValueError("give mean and std together (e.g. --normalize 0.5 0.25)")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        for vals in (mean, std):
            if vals is not None and len(vals) != 1 and self.channels is not None and len(vals) != self.channels:
                raise ValueError(f"mean/std have {len(vals)} values but images have {self.channels} channel(s)")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def __call__(self, path: str | Path) -> torch.Tensor:
        x = load_image(path, channels=self.channels)
        if self.size is not None and tuple(x.shape[1:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x.unsqueeze(0), size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)[0]
        if self.transform is not None:
            x = self._transformed(x, path)
        if self.mean is not None:
            for vals in (self.mean, self.std):  # a longer std would broadcast a gray image to 3 channels
                if len(vals) not in (1, x.shape[0]):
                    raise ValueError(f"image {path} has {x.shape[0]} channel(s) but mean/std have {len(vals)} "
                                     "values; give one per channel, or --channels")
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            x = (x - mean) / std
        return x

    def _transformed(self, x: torch.Tensor, path) -> torch.Tensor:
        """``transform(x)`` as a float32 tensor; its failure is one error naming the image."""
        import numpy as np

        try:
            y = self.transform(x)
        except Exception as e:  # noqa: BLE001 - the user's transform may raise anything
            text = str(e).strip().splitlines()
            raise ValueError(f"the transform (--transform) raised {type(e).__name__}"
                             f"{': ' + text[0] if text else ''} on image {path}; fix the transform or drop it") from e
        if isinstance(y, np.ndarray):
            y = torch.from_numpy(np.ascontiguousarray(y))
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the transform (--transform) returned {type(y).__name__} for image {path}; it must "
                            "return a tensor or a numpy array (the image, C x H x W)")
        return y.as_subclass(torch.Tensor).to(torch.float32)


def find_unreadable(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The files among ``paths`` that cannot be opened as images: tidy ``path, error``.

    Reads each file's header and checks its integrity with Pillow's ``verify`` (no full decode).
    """
    from PIL import Image

    rows = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - every failure to open is a reason to skip the file
            rows.append({"path": str(p), "error": f"{type(e).__name__}: {e}"})
    return pd.DataFrame(rows, columns=["path", "error"])
