"""Generated multi-site segmentation data, 2-D and 3-D: ``seg-sites-2d`` and ``seg-sites-3d``.

Why: segmenters (U-Nets with BatchNorm) meet scanner shift as classifiers do, and a set built in
seconds from a seed lets tests, examples and the CLI show it without a download. Every case is a
body with an organ (bright, class 1) and a lesion (darker than the organ, brighter than the body,
class 2), each sometimes absent; every
site is a simulated scanner with its own voxel spacing, resolution, intensity scale and offset,
gamma, bias field and noise (``SegSite``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from shiftbn.data._checks import as_count
from shiftbn.data.tagged import SourceTaggedDataset

SEG_CLASSES = ("background", "organ", "lesion")
_TISSUE = {"air": 0.0, "body": (0.30, 0.38), "organ": (0.85, 0.95), "lesion": (0.56, 0.66)}
_ABSENT = {"organ": 0.1, "lesion": 0.25}  # probability that a case lacks the structure


@dataclass(frozen=True)
class SegSite:
    """One simulated scanner: how it turns the same anatomy into voxels and intensities.

    Why: scanners differ in voxel size and resolution, in the scale and offset of their intensities,
    in contrast, in coil inhomogeneity (a smooth multiplicative bias field) and in noise; BatchNorm
    statistics see all of these. Order of operations on the tissue image (values in [0, 1]):
    sampling on the site's grid (``spacing``) -> blur -> gamma -> bias field -> noise -> scale/offset.

    Args:
        scale: multiplies intensities (default 1); > 0.
        offset: added to intensities after ``scale`` (default 0).
        gamma: contrast exponent on the tissue image (default 1: none); > 0.
        bias: strength of the bias field: intensities are multiplied by ``exp(bias * b(x))`` with
            ``b`` a smooth random field in [-1, 1], new per case (default 0: none); >= 0.
        noise_std: additive Gaussian noise std, in tissue units (before ``scale``; default 0.02); >= 0.
        blur_sigma: Gaussian point-spread std in voxels (default 0: none); >= 0.
        spacing: voxel size in mm, (depth, height, width); 2-D sets use (height, width) = the last two
            (default (2.0, 1.0, 1.0)); each > 0. The anatomy has a fixed size in mm, so a larger
            spacing shows it over fewer voxels.

    Returns:
        A frozen ``SegSite``, used by ``seg_sites_2d``/``seg_sites_3d``.

    Raises:
        ValueError: a parameter outside its range (the message names it).

    Example:
        >>> site = SegSite(scale=2.0, offset=0.5, spacing=(3.0, 0.8, 0.8))
        >>> site.spacing_for(2)
        (0.8, 0.8)
    """

    scale: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    bias: float = 0.0
    noise_std: float = 0.02
    blur_sigma: float = 0.0
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("scale", "gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SegSite {name} must be a finite number > 0, got {value!r}")
        for name in ("bias", "noise_std", "blur_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SegSite {name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.offset, (int, float)) and math.isfinite(self.offset)):
            raise ValueError(f"SegSite offset must be a finite number, got {self.offset!r}")
        sp = tuple(self.spacing) if isinstance(self.spacing, Sequence) else ()
        if len(sp) != 3 or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sp):
            raise ValueError(f"SegSite spacing must be three voxel sizes in mm (depth, height, width), each > 0, "
                             f"got {self.spacing!r}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in sp))

    def spacing_for(self, ndim: int) -> tuple[float, ...]:
        """The voxel size in mm for ``ndim`` spatial dimensions: (d, h, w) for 3, (h, w) for 2.

        Why: one site describes both the 2-D and the 3-D set; a 2-D image is an in-plane slice.

        Args:
            ndim: 2 or 3.

        Returns:
            A tuple of ``ndim`` floats, mm per voxel, in array order.

        Example:
            >>> SegSite(spacing=(2.5, 1.0, 0.9)).spacing_for(3)
            (2.5, 1.0, 0.9)
        """
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
        return self.spacing[-ndim:]


# Site 0 is the reference: the anatomy is drawn to fill its field of view.
SEG_SITES: dict[str, SegSite] = {
    "site_a": SegSite(noise_std=0.02, bias=0.05, spacing=(2.0, 1.0, 1.0)),
    "site_b": SegSite(scale=1.25, offset=0.1, gamma=0.8, bias=0.15, noise_std=0.04, blur_sigma=0.6,
                      spacing=(3.0, 0.85, 0.85)),
    "site_c": SegSite(scale=0.8, offset=-0.05, gamma=1.3, bias=0.25, noise_std=0.03, blur_sigma=1.0,
                      spacing=(2.5, 1.2, 1.2)),
    "site_d": SegSite(scale=1.5, offset=0.2, bias=0.1, noise_std=0.07, blur_sigma=0.3, spacing=(1.5, 1.0, 1.0)),
    "site_e": SegSite(scale=2.5, offset=0.8, gamma=0.6, bias=0.3, noise_std=0.05, blur_sigma=1.4,
                      spacing=(4.0, 0.9, 0.9)),
    "site_f": SegSite(scale=0.5, offset=-0.2, gamma=1.8, bias=0.05, noise_std=0.1, spacing=(1.0, 1.1, 1.1)),
}


class SegArrays(Dataset):
    """In-memory segmentation cases: items ``(image, {"mask": ..., "spacing": ...})``.

    Why: the generated sets hold every case in three tensors; items follow the segmentation item
    contract (image float32 (C, *spatial), mask int64 (*spatial), spacing float64 (ndim,) in mm).
    It exposes no ``targets``/``labels`` (there is no class id per case), so a ``SourceTaggedDataset``
    over it has ``labels`` None.

    Args:
        images: (N, C, *spatial) float32.
        masks: (N, *spatial) integer label maps (stored as uint8 when they fit).
        spacings: (N, ndim) voxel sizes in mm, or ``None`` (then items' targets are the bare masks).

    Returns:
        A map-style dataset of N items.

    Example:
        >>> data = SegArrays(torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 4, dtype=torch.long), torch.ones(2, 2))
        >>> x, y = data[1]
        >>> tuple(x.shape), y["mask"].dtype, y["spacing"].tolist()
        ((1, 4, 4), torch.int64, [1.0, 1.0])
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, spacings: torch.Tensor | None = None) -> None:
        if images.ndim < 3 or masks.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(f"images (N, C, *spatial) and masks (N, *spatial) disagree: {tuple(images.shape)} vs "
                             f"{tuple(masks.shape)}")
        if spacings is not None and tuple(spacings.shape) != (len(images), images.ndim - 2):
            raise ValueError(f"spacings must be (N, {images.ndim - 2}), got {tuple(spacings.shape)}")
        self.images = images.to(torch.float32)
        fits = masks.numel() == 0 or (int(masks.min()) >= 0 and int(masks.max()) < 256)
        self.masks = masks.to(torch.uint8) if fits else masks.to(torch.int64)
        self.spacings = None if spacings is None else spacings.to(torch.float64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | torch.Tensor]:
        mask = self.masks[i].to(torch.int64)
        if self.spacings is None:
            return self.images[i], mask
        return self.images[i], {"mask": mask, "spacing": self.spacings[i].clone()}

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        return [self[i] for i in indices]


def seg_sites_2d(n: int = 60, size: int = 64, sites: int | Mapping[str, SegSite] = 4,
                 seed: int = 0) -> SourceTaggedDataset:
    """Generated 2-D multi-site segmentation: ``n`` cases per site, images ``size`` x ``size``.

    Why: a segmentation set with scanner-like site shift (``SegSite``) that builds in well under a
    second, for tests, examples and the CLI (``sb.load("seg-sites-2d")``; datasets/seg-sites.md).
    Items ``(image, target, source_id)``: image float32 (1, size, size); target
    ``{"mask": int64 (size, size), "spacing": float64 (2,)}`` (mm per pixel, (height, width)).
    ``class_names`` ("background", "organ", "lesion"); ``labels`` is None; ``metadata`` has one
    column ``case`` (``"<site>_<k>"``).

    Args:
        n: cases per site (default 60).
        size: image side in pixels (default 64; >= 8).
        sites: how many of ``SEG_SITES`` (1 to 6; default 4: ``site_a`` .. ``site_d``), or a mapping
            name -> ``SegSite``.
        seed: seeds every case (case k of a site is the same whatever ``n``).

    Returns:
        A ``SourceTaggedDataset`` of ``n`` cases per site, sources named as the sites, ``source_word`` "site".

    Raises:
        ValueError: ``n``, ``size`` or ``sites`` out of range.

    Example:
        >>> ds = seg_sites_2d(n=2, size=16)
        >>> x, y, s = ds[0]
        >>> tuple(x.shape), tuple(y["mask"].shape), y["spacing"].tolist(), ds.class_names
        ((1, 16, 16), (16, 16), [1.0, 1.0], ('background', 'organ', 'lesion'))
    """
    return _build(2, n, size, sites, seed)


def seg_sites_3d(n: int = 24, size: int = 32, sites: int | Mapping[str, SegSite] = 4,
                 seed: int = 0) -> SourceTaggedDataset:
    """Generated 3-D multi-site segmentation: ``n`` volumes per site of ``size``^3 voxels.

    Why: the volumetric twin of ``seg_sites_2d`` for 3-D U-Nets with BatchNorm3d; sites differ in
    voxel spacing (slice thickness), resolution, intensities, bias field and noise (``SegSite``).
    Items ``(image, target, source_id)``: image float32 (1, size, size, size) as (C, D, H, W); target
    ``{"mask": int64 (D, H, W), "spacing": float64 (3,)}`` (mm per voxel, (depth, height, width)).
    ``class_names`` ("background", "organ", "lesion"); ``labels`` is None.

    Args:
        n: volumes per site (default 24).
        size: volume side in voxels (default 32; >= 8).
        sites: how many of ``SEG_SITES`` (1 to 6; default 4), or a mapping name -> ``SegSite``.
        seed: seeds every case.

    Returns:
        A ``SourceTaggedDataset`` of ``n`` volumes per site.

    Raises:
        ValueError: ``n``, ``size`` or ``sites`` out of range.

    Example:
        >>> ds = seg_sites_3d(n=1, size=8, sites=2)
        >>> x, y, s = ds[1]
        >>> tuple(x.shape), y["spacing"].tolist(), ds.source_names
        ((1, 8, 8, 8), [3.0, 0.85, 0.85], ('site_a', 'site_b'))
    """
    return _build(3, n, size, sites, seed)


def _site_table(sites: int | Mapping[str, SegSite]) -> dict[str, SegSite]:
    if isinstance(sites, Mapping):
        if not sites:
            raise ValueError("sites must name at least one site, got an empty mapping")
        bad = [k for k, v in sites.items() if not isinstance(v, SegSite)]
        if bad:
            raise TypeError(f"sites maps names to SegSite objects; {bad[:3]} map to something else")
        return {str(k): v for k, v in sites.items()}
    count = as_count(sites, "sites")
    if count > len(SEG_SITES):
        raise ValueError(f"sites must be 1 to {len(SEG_SITES)} (the built-in SEG_SITES), got {count}; pass a "
                         "mapping name -> SegSite for more")
    return dict(list(SEG_SITES.items())[:count])


def _build(ndim: int, n: int, size: int, sites: int | Mapping[str, SegSite], seed: int) -> SourceTaggedDataset:
    n = as_count(n, "n")
    size = as_count(size, "size", minimum=8)
    seed = as_count(seed, "seed", minimum=0)
    table = _site_table(sites)
    reference = next(iter(table.values())).spacing_for(ndim)
    images, masks, spacings, cases, ids = [], [], [], [], []
    for s, (name, site) in enumerate(table.items()):
        for k in range(n):
            rng = np.random.default_rng([seed, s, k, ndim])
            img, mask = _case(rng, site, ndim, size, reference)
            images.append(img)
            masks.append(mask)
            spacings.append(site.spacing_for(ndim))
            cases.append(f"{name}_{k:03d}")
            ids.append(s)
    base = SegArrays(torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(masks)),
                     torch.tensor(spacings, dtype=torch.float64))
    return SourceTaggedDataset(base, np.asarray(ids, dtype=np.int64), source_names=list(table),
                               class_names=SEG_CLASSES, metadata=pd.DataFrame({"case": cases}), source_word="site")


def _case(rng: np.random.Generator, site: SegSite, ndim: int, size: int,
          reference: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One case on ``site``'s grid: image float32 (*spatial) and mask uint8 (*spatial)."""
    from scipy.ndimage import gaussian_filter

    spacing = site.spacing_for(ndim)
    # coordinates in units of the reference site's half field of view: the anatomy is fixed in mm
    axes = [(np.arange(size) - (size - 1) / 2) * sp / (size * ref / 2) for sp, ref in zip(spacing, reference,
                                                                                          strict=True)]
    u = np.stack(np.meshgrid(*axes, indexing="ij"))  # (ndim, *spatial)
    body = _ellipsoid(u, np.zeros(ndim), rng.uniform(0.62, 0.78, ndim), _rotation(rng, ndim)) < 1
    mask = np.zeros(u.shape[1:], dtype=np.uint8)
    tissue = np.where(body, rng.uniform(*_TISSUE["body"]), _TISSUE["air"])
    if rng.random() >= _ABSENT["organ"]:
        centre = rng.uniform(-0.3, 0.3, ndim)
        organ = body & (_ellipsoid(u, centre, rng.uniform(0.25, 0.5, ndim), _rotation(rng, ndim)) < 1)
        mask[organ] = 1
        tissue = np.where(organ, rng.uniform(*_TISSUE["organ"]), tissue)
    if rng.random() >= _ABSENT["lesion"]:
        centre = rng.uniform(-0.35, 0.35, ndim)
        radius = rng.uniform(0.16, 0.3)
        wobble = _smooth_noise(rng, u.shape[1:], size / 8)
        dist = np.sqrt(((u - centre.reshape((ndim,) + (1,) * ndim)) ** 2).sum(0)) / radius + 0.35 * wobble
        lesion = body & (dist < 1)
        mask[lesion] = 2
        tissue = np.where(lesion, rng.uniform(*_TISSUE["lesion"]), tissue)
    tissue = tissue + body * 0.04 * _smooth_noise(rng, u.shape[1:], 1.5)  # texture
    if site.blur_sigma > 0:
        tissue = gaussian_filter(tissue, site.blur_sigma, mode="nearest")
    tissue = np.clip(tissue, 0.0, None) ** site.gamma
    if site.bias > 0:
        tissue = tissue * np.exp(site.bias * _bias_field(rng, u))
    tissue = tissue + site.noise_std * rng.standard_normal(tissue.shape)
    return (site.scale * tissue + site.offset).astype(np.float32), mask


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A random rotation matrix (ndim, ndim) (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return q * np.sign(np.diag(r))


def _ellipsoid(u: np.ndarray, centre: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """The quadratic form of an ellipsoid at every point of ``u`` (ndim, *spatial): < 1 inside."""
    ndim = u.shape[0]
    local = np.tensordot(rot.T, u - centre.reshape((ndim,) + (1,) * ndim), axes=1)
    return ((local / axes.reshape((ndim,) + (1,) * ndim)) ** 2).sum(0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise smoothed with a Gaussian of ``sigma`` voxels, scaled to unit standard deviation."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-12)


def _bias_field(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """A smooth field in [-1, 1]: a random quadratic polynomial of the coordinates, scaled to max |b| = 1."""
    ndim = u.shape[0]
    lin = rng.standard_normal(ndim).reshape((ndim,) + (1,) * ndim)
    quad = rng.standard_normal(ndim).reshape((ndim,) + (1,) * ndim)
    field = (lin * u).sum(0) + 0.5 * (quad * u ** 2).sum(0)
    field = field - field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)
