"""ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) for small images, seeded.

Why: real sites differ in sensor noise, optics, contrast and compression, not only in intensity;
these are the published corruption types, re-implemented from their formulas (the maintained
``imagecorruptions`` package refuses images under 32 px and is not used).

Severity tables are the authors' CIFAR-10-C parameters (their own adaptation of ImageNet-C to
32x32 images), used unscaled on 16-32 px images: pixel sizes (blur sigma, defocus radius) are in
pixels as published. Scaling them by H / 32 was rejected: on 28 px it turns severity 5's 3x3
defocus disk into a 5-pixel plus, and on 16 px into no blur at all (a discrete threshold, not an
optical adaptation). Images are float arrays in [0, 1], (N, H, W) or (N, C, H, W); outputs are
clipped to [0, 1].
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# name -> five severities (1..5); tuples are (radius px, anti-alias sigma px) for defocus blur.
SEVERITIES: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive N(0, std^2)
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate: photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of pixels set to 0 or 1
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # std of multiplicative noise x * (1 + N(0, std^2))
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma, px
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from each image's mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side ratio of the box-downsampled image
}


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``clip(x + N(0, std^2))`` per pixel."""
    return np.clip(x + rng.normal(0.0, std, size=x.shape), 0.0, 1.0)


def shot_noise(x: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``clip(Poisson(x * rate) / rate)``: photon noise, variance ``x / rate``."""
    return np.clip(rng.poisson(np.clip(x, 0.0, None) * rate) / rate, 0.0, 1.0)


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: each pixel with probability ``amount`` becomes 1 or 0 (even odds)."""
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = np.clip(x, 0.0, 1.0)
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def speckle_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``clip(x + x * N(0, std^2))``: noise proportional to intensity."""
    return np.clip(x + x * rng.normal(0.0, std, size=x.shape), 0.0, 1.0)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of every image, ``sigma`` in pixels, kernel truncated at 4 sigma, edges repeated."""
    from scipy.ndimage import gaussian_filter

    sig = (0.0,) * (x.ndim - 2) + (sigma, sigma)
    return np.clip(gaussian_filter(x, sig, mode="nearest", truncate=4.0), 0.0, 1.0)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: a normalized disk ``u^2 + v^2 <= radius^2`` smoothed by a 3x3 Gaussian.

    Returns a (2r+1, 2r+1) float64 array summing to 1, r = ceil(radius) + 1 (room for the smoothing).
    """
    half = int(np.ceil(radius)) + 1
    grid = np.arange(-half, half + 1)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-0.5 * (np.arange(-1, 2) / alias_blur) ** 2)
    taps /= taps.sum()
    from scipy.ndimage import correlate1d

    smooth = correlate1d(disk, taps, axis=0, mode="mirror")
    return correlate1d(smooth, taps, axis=1, mode="mirror")


def defocus_blur(x: np.ndarray, radius: float, alias_blur: float) -> np.ndarray:
    """Filter every image with ``disk_kernel(radius, alias_blur)``; edges mirrored (d c b | a b c d)."""
    from scipy.ndimage import correlate

    k = disk_kernel(radius, alias_blur)
    k = k.reshape((1,) * (x.ndim - 2) + k.shape)
    return np.clip(correlate(x, k, mode="mirror"), 0.0, 1.0)


def contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """``clip((x - m) * factor + m)``, m the mean of each image and channel over its pixels."""
    m = x.mean(axis=(-2, -1), keepdims=True)
    return np.clip((x - m) * factor + m, 0.0, 1.0)


def brightness(x: np.ndarray, shift: float) -> np.ndarray:
    """Add ``shift`` to the HSV value (max over channels), keeping hue and saturation.

    Grey images: ``clip(x + shift)``. Colour images (N, C, H, W): every channel is scaled by
    ``V' / V`` (``V' = clip(V + shift)``); black pixels become grey ``V'``.
    """
    if x.ndim == 3 or x.shape[1] == 1:
        return np.clip(x + shift, 0.0, 1.0)
    v = x.max(axis=1, keepdims=True)
    v_new = np.clip(v + shift, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(v > 0, x * (v_new / np.where(v > 0, v, 1.0)), v_new)
    return np.clip(out, 0.0, 1.0)


def _pil_each(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``fn`` to every (H, W) or (H, W, C) image of (N, H, W) or (N, C, H, W)."""
    if x.ndim == 3:
        return np.stack([fn(img) for img in x]) if len(x) else x.copy()
    chw = np.moveaxis(x, 1, -1)
    if chw.shape[-1] == 1:
        return np.stack([fn(img[..., 0]) for img in chw])[:, None] if len(x) else x.copy()
    return np.moveaxis(np.stack([fn(img) for img in chw]), -1, 1) if len(x) else x.copy()


def jpeg_compression(x: np.ndarray, quality: int) -> np.ndarray:
    """Encode every image as JPEG at ``quality`` (Pillow, 8 bits) and decode it; grey stays grey."""
    from PIL import Image

    if x.ndim == 4 and x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG takes grey or RGB images (1 or 3 channels), got {x.shape[1]} channels")

    def one(img: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        return np.asarray(Image.open(buf), dtype=np.float64) / 255.0

    return _pil_each(x, one)


def pixelate(x: np.ndarray, factor: float) -> np.ndarray:
    """Box-downsample every image to ``int(side * factor)`` pixels and box-upsample it back (Pillow)."""
    from PIL import Image

    def one(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        small = (max(1, int(w * factor)), max(1, int(h * factor)))
        planes = img[..., None] if img.ndim == 2 else img
        out = []
        for c in range(planes.shape[-1]):
            p = Image.fromarray(planes[..., c].astype(np.float32))
            p = p.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
            out.append(np.asarray(p, dtype=np.float64))
        res = np.stack(out, axis=-1)
        return res[..., 0] if img.ndim == 2 else res

    return np.clip(_pil_each(x, one), 0.0, 1.0)


_NOISY = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
          "speckle_noise": speckle_noise}
_PLAIN = {"contrast": contrast, "brightness": brightness, "jpeg_compression": jpeg_compression,
          "pixelate": pixelate}


@dataclass(frozen=True)
class Corruption:
    """One site's corruption: an ImageNet-C type at a severity 1..5 (``"clean"``, severity 0: none).

    Why: a lab of ``simulate_labs`` whose shift is a published corruption rather than an intensity
    change. ``seed`` draws the noise (noise types only); ``class_prior`` as in ``LabShift`` (None:
    the lab takes every class equally). Types: ``SEVERITIES``' keys; parameters: ``params``.

    Args:
        name: a corruption type (a key of ``SEVERITIES``) or ``"clean"``.
        severity: 1..5 (default 3); 0 for ``"clean"``.
        seed: seeds the noise of noise types (default 0).
        class_prior: (K,) per-class weights for ``simulate_labs``, or ``None``.

    Returns:
        A frozen ``Corruption`` with ``label`` (the lab name), ``params`` and ``apply``.

    Raises:
        ValueError: an unknown type or a severity outside 1..5 (0 for ``"clean"``).

    Example:
        >>> c = Corruption("gaussian_noise", 5, seed=1)
        >>> c.label, c.params
        ('gaussian_noise_5', (0.1,))
    """

    name: str
    severity: int = 3
    seed: int = 0
    class_prior: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name == "clean":
            if self.severity != 0:
                raise ValueError(f"'clean' takes severity 0, got {self.severity}")
            return
        if self.name not in SEVERITIES:
            raise ValueError(f"unknown corruption {self.name!r}; choose from {['clean', *sorted(SEVERITIES)]}")
        if self.severity not in range(1, 6):
            raise ValueError(f"severity must be 1..5 for {self.name!r}, got {self.severity}")

    @property
    def label(self) -> str:
        """``"<name>_<severity>"`` (``"clean"`` for none), the lab name the built-in datasets use."""
        return "clean" if self.name == "clean" else f"{self.name}_{self.severity}"

    @property
    def params(self) -> tuple[float, ...]:
        """This severity's parameters, as in ``SEVERITIES`` (empty for ``"clean"``)."""
        if self.name == "clean":
            return ()
        p = SEVERITIES[self.name][self.severity - 1]
        return tuple(p) if isinstance(p, tuple) else (p,)

    def apply(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Corrupt a batch of images with this type and severity.

        Why: ImageNet-C shifts (noise, blur, contrast, JPEG) are not undone by BN's affine rescaling.

        Args:
            images: (N, H, W) or (N, C, H, W) floats in [0, 1], numpy or torch.

        Returns:
            A float32 tensor of the same shape, clipped to [0, 1]; deterministic given ``seed``.

        Raises:
            ValueError: another number of dimensions.

        Example:
            >>> out = Corruption("contrast", 5).apply(np.full((2, 8, 8), 0.5))
            >>> tuple(out.shape), out.dtype
            ((2, 8, 8), torch.float32)
        """
        x = np.asarray(images, dtype=np.float64)
        if x.ndim not in (3, 4):
            raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
        p = self.params
        if self.name == "clean":
            out = x
        elif self.name in _NOISY:
            out = _NOISY[self.name](x, *p, np.random.default_rng(self.seed))
        elif self.name == "gaussian_blur":
            out = gaussian_blur(x, *p)
        elif self.name == "defocus_blur":
            out = defocus_blur(x, *p)
        else:
            out = _PLAIN[self.name](x, *p)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
