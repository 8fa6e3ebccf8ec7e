"""The lab acquisition-shift model: how one lab's scanner or stain changes the same images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shiftbn.data.arrays import ArrayDataset
from shiftbn.data.tagged import SourceTaggedDataset


@dataclass(frozen=True)
class LabShift:
    """One lab's acquisition shift, applied to images in [0, 1].

    Why: real labs differ by gain, offset, gamma, optics (blur), sensor noise, stain/colour and
    patient mix; BN statistics see all of these. The order of operations is
    gamma -> blur -> colour matrix -> gain/offset -> noise. Deterministic given ``seed``.

    gain, offset: intensity ``x * gain + offset`` (offset in image units).
    gamma: ``x ** gamma`` on the clipped input (1 = none).
    blur_sigma: Gaussian blur std in pixels (0 = none).
    noise_std: additive Gaussian noise std in image units.
    color_matrix: optional (C, C) channel-mixing matrix for RGB (stain shift).
    class_prior: optional per-class weights (K,) used by ``simulate_labs`` to skew the class mix.

    Args:
        gain: multiplies intensities (default 1).
        offset: added to intensities, image units (default 0).
        gamma: exponent on the clipped input (default 1: none); > 0.
        blur_sigma: Gaussian blur std, pixels (default 0: none); >= 0.
        noise_std: additive Gaussian noise std, image units (default 0); >= 0.
        color_matrix: (C, C) channel-mixing matrix, or ``None``.
        class_prior: (K,) non-negative per-class weights, or ``None`` (every class weighs 1).
        seed: seeds the noise.

    Returns:
        A frozen ``LabShift``; ``apply`` shifts images, ``simulate_labs`` builds a dataset of labs.

    Raises:
        ValueError: ``gamma <= 0``, a negative ``blur_sigma``/``noise_std`` or negative prior weights.

    Example:
        >>> shift = LabShift(gain=0.5, offset=0.1)
        >>> shift.apply(torch.ones(2, 1, 3, 3)).unique().tolist()
        [0.6000000238418579]
    """

    gain: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    color_matrix: tuple[tuple[float, ...], ...] | None = None
    class_prior: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.blur_sigma < 0 or self.noise_std < 0:
            raise ValueError("blur_sigma and noise_std must be >= 0")
        if self.class_prior is not None and (np.asarray(self.class_prior) < 0).any():
            raise ValueError("class_prior weights must be >= 0")

    def apply(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Apply this lab's shift to a batch of images.

        Why: the same images seen through several labs isolate acquisition shift from content.

        Args:
            images: (N, C, H, W) or (N, H, W) floats in [0, 1], numpy or torch.

        Returns:
            A float32 tensor of the same shape (not clipped).

        Raises:
            ValueError: another number of dimensions, or a ``color_matrix`` that does not fit C.

        Example:
            >>> LabShift(gamma=2.0).apply(np.full((1, 2, 2), 0.5)).tolist()
            [[[0.25, 0.25], [0.25, 0.25]]]
        """
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        squeeze = x.ndim == 3
        if squeeze:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}")
        if self.gamma != 1.0:
            x = x.clamp(min=0.0) ** self.gamma
        if self.blur_sigma > 0:
            x = _gaussian_blur(x, self.blur_sigma)
        if self.color_matrix is not None:
            m = torch.tensor(self.color_matrix, dtype=torch.float32)
            if m.shape != (x.shape[1], x.shape[1]):
                raise ValueError(f"color_matrix must be ({x.shape[1]}, {x.shape[1]}), got {tuple(m.shape)}")
            x = torch.einsum("dc,nchw->ndhw", m, x)
        x = x * self.gain + self.offset
        if self.noise_std > 0:
            g = torch.Generator().manual_seed(self.seed)
            x = x + self.noise_std * torch.randn(x.shape, generator=g)
        return x.squeeze(1) if squeeze else x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def simulate_labs(
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray,
    labs: Mapping[str, LabShift],
    seed: int = 0,
    *,
    class_names: Sequence[str] | None = None,
) -> SourceTaggedDataset:
    """Split images into disjoint labs and apply each lab's shift.

    Why: a controlled multi-lab dataset where the true shift of every lab is known.
    A sample of class k goes to lab L with probability proportional to ``labs[L].class_prior[k]``
    (1 when no prior), so labs have about equal sizes unless priors skew them.

    Args:
        images: (N, C, H, W) or (N, H, W) floats in [0, 1].
        labels: (N,) class ids 0..K-1.
        labs: lab name -> its ``LabShift`` (or ``Corruption``); at least one.
        seed: seeds the assignment of samples to labs.
        class_names: one name per class id (default: none).

    Returns:
        A ``SourceTaggedDataset`` over the shifted float32 images (an ``ArrayDataset``), sources in
        sorted name order; its ``source_word`` is ``"lab"``.

    Raises:
        ValueError: no labs, images and labels of different lengths, or class priors that do not fit.

    Example:
        >>> labs = {"dim": LabShift(gain=0.5), "plain": LabShift()}
        >>> ds = simulate_labs(torch.rand(40, 1, 4, 4), np.arange(40) % 2, labs, seed=0)
        >>> ds.source_names, len(ds)
        (('dim', 'plain'), 40)
    """
    if not labs:
        raise ValueError("labs must name at least one lab")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    names = sorted(labs)
    k = int(y.max()) + 1 if y.size else 0
    weights = np.ones((len(names), k))
    for i, name in enumerate(names):
        prior = labs[name].class_prior
        if prior is not None:
            if len(prior) != k:
                raise ValueError(f"lab {name!r}: class_prior has {len(prior)} weights for {k} classes")
            weights[i] = prior
    if (weights.sum(axis=0) <= 0).any():
        raise ValueError("every class needs a positive class_prior weight in at least one lab")
    prob = weights / weights.sum(axis=0, keepdims=True)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(prob[:, y], axis=0)  # (labs, N)
    assign = (rng.random(len(y))[None, :] > cum).sum(axis=0).clip(max=len(names) - 1)
    out = torch.empty_like(x)
    for i, name in enumerate(names):
        members = np.flatnonzero(assign == i)
        if members.size:
            out[torch.from_numpy(members)] = labs[name].apply(x[torch.from_numpy(members)])
    return SourceTaggedDataset(ArrayDataset(out, y), assign, y, source_names=names, class_names=class_names,
                               source_word="lab")
