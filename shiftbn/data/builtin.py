"""Built-in multi-lab datasets, loadable by name: ``digits-labs``, ``fashion-mnist-labs``, ``blobs-labs``.

Nothing here downloads: digits ship with scikit-learn, Fashion-MNIST with Debian's
``dataset-fashion-mnist`` package, blobs are generated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shiftbn.data.arrays import ArrayDataset
from shiftbn.data.idx import read_idx
from shiftbn.data.labshift import LabShift, simulate_labs
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


def digits_labs(size: int = 16, seed: int = 0) -> SourceTaggedDataset:
    """scikit-learn's 1,797 bundled 8x8 digits, upsampled to ``size``x``size``, split over 5 labs.

    Items: x (1, size, size) float32, y in 0..9 (``class_names`` "0".."9").
    Labs: see ``DIGITS_LABS`` and datasets/digits-labs.md.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return simulate_labs(x, d.target, DIGITS_LABS, seed=seed, class_names=DIGITS_CLASSES)


def fashion_mnist_labs(
    root: str | Path | None = None, n: int = 12000, split: str = "train", seed: int = 0
) -> SourceTaggedDataset:
    """Fashion-MNIST (28x28 grey clothing, 10 classes) split over 4 labs; ``n`` samples drawn with ``seed``.

    ``class_names``: Fashion-MNIST's ten names ("T-shirt/top" .. "Ankle boot", ``FASHION_CLASSES``).
    Data: the IDX files of Debian's ``dataset-fashion-mnist`` package, or a folder given as ``root``.
    """
    folder = Path(root) if root is not None else FASHION_DEBIAN_ROOT
    prefix = "train" if split == "train" else "t10k"
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    x_all, y_all = read_idx(images), read_idx(labels)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y_all), size=min(n, len(y_all)), replace=False))
    x = torch.as_tensor(x_all[pick], dtype=torch.float32).unsqueeze(1) / 255.0
    return simulate_labs(x, y_all[pick], FASHION_LABS, seed=seed, class_names=FASHION_CLASSES)


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
    with strength growing in k. Meant for fast tests of MLPs with BatchNorm1d.
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
    return SourceTaggedDataset(ArrayDataset(x.astype(np.float32), y), lab, y, source_names=names)


DATASETS: dict[str, Callable[..., SourceTaggedDataset]] = {
    "digits-labs": digits_labs,
    "fashion-mnist-labs": fashion_mnist_labs,
    "blobs-labs": blobs_labs,
}


def load(name: str, **kwargs) -> SourceTaggedDataset:
    """Load a built-in multi-lab dataset by name (``digits-labs``, ``fashion-mnist-labs``, ``blobs-labs``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
