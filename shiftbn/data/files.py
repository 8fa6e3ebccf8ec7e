"""Datasets backed by files on disk: manifests, image-folder trees, the WILDS Camelyon17 layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from shiftbn.data.tagged import SourceTaggedDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def load_image(path: str | Path) -> torch.Tensor:
    """Decode one image file into a float32 tensor (C, H, W) in [0, 1]."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    t = torch.from_numpy(arr.astype(np.float32) / 255.0)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class FileDataset(Dataset):
    """Items are ``(loader(path), label)``; files are decoded lazily, one per ``__getitem__``."""

    def __init__(self, paths: list[str], labels: np.ndarray, loader: Callable[[str], Any] = load_image):
        self.paths = paths
        self.targets = np.asarray(labels, dtype=np.int64)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.loader(self.paths[i]), int(self.targets[i])


def _read_table(frame: pd.DataFrame | str | Path) -> tuple[pd.DataFrame, Path | None]:
    if isinstance(frame, pd.DataFrame):
        return frame, None
    path = Path(frame)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path), path.parent
        except ImportError as e:
            raise ImportError("reading Parquet needs pyarrow: pip install 'shiftbn[parquet]'") from e
    return pd.read_csv(path), path.parent


def from_frame(
    frame: pd.DataFrame | str | Path,
    *,
    path: str = "path",
    label: str | None = "label",
    source: str = "source",
    loader: Callable[[str], Any] = load_image,
    root: str | Path | None = None,
) -> SourceTaggedDataset:
    """A dataset from a manifest table (DataFrame, CSV or Parquet file) with path, label, source columns.

    Relative paths resolve against ``root`` (default: the manifest's folder). Labels that are not
    integers are encoded in sorted order; ``label=None`` makes an unlabeled dataset.
    """
    df, here = _read_table(frame)
    missing = [c for c in (path, label, source) if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}; it has {list(df.columns)}")
    base = Path(root) if root is not None else here
    paths = [str(p if Path(p).is_absolute() or base is None else base / p) for p in df[path].astype(str)]
    if label is None:
        labels = np.full(len(df), -1, dtype=np.int64)
    elif pd.api.types.is_integer_dtype(df[label]):
        labels = df[label].to_numpy(np.int64)
    else:
        labels = pd.Categorical(df[label]).codes.astype(np.int64)
    return SourceTaggedDataset(FileDataset(paths, labels, loader), df[source].to_numpy(), labels)


def from_folder(root: str | Path, loader: Callable[[str], Any] = load_image) -> SourceTaggedDataset:
    """A dataset from an image tree ``root/<source>/<class>/<file>``; classes sorted by name.

    Class ids are shared across sources (the union of class folder names, sorted).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    rows = [
        (str(f), src.name, cls.name)
        for src in sorted(p for p in root.iterdir() if p.is_dir())
        for cls in sorted(p for p in src.iterdir() if p.is_dir())
        for f in sorted(cls.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise ValueError(f"no images found under {root}; expected root/<source>/<class>/<image file>")
    df = pd.DataFrame(rows, columns=["path", "source", "label"])
    classes = sorted(df["label"].unique())
    labels = df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    ds = SourceTaggedDataset(FileDataset(df["path"].tolist(), labels, loader), df["source"].to_numpy(), labels)
    ds.class_names = classes
    return ds


CAMELYON_COLUMNS = ["patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]


def camelyon17(root: str | Path, loader: Callable[[str], Any] = load_image) -> SourceTaggedDataset:
    """The WILDS Camelyon17 on-disk layout: ``root/metadata.csv`` and ``root/patches/...`` PNGs.

    Why: the hospital (``center``, 5 of them) is the textbook medical-imaging domain shift.
    Source = ``center`` (named ``center_<k>``), label = ``tumor`` (0/1). Extra columns are kept on
    ``ds.metadata`` (a DataFrame, one row per sample).
    """
    root = Path(root)
    meta_path = root / "metadata.csv"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found; download Camelyon17 with WILDS (wilds.get_dataset('camelyon17', "
            "download=True)) and pass its camelyon17_v1.0 folder as root"
        )
    meta = pd.read_csv(meta_path, index_col=0) if _has_index_column(meta_path) else pd.read_csv(meta_path)
    missing = [c for c in CAMELYON_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(f"{meta_path} lacks column(s) {missing}")
    paths = [
        str(root / "patches" / f"patient_{p:03d}_node_{n}" / f"patch_patient_{p:03d}_node_{n}_x_{x}_y_{y}.png")
        for p, n, x, y in meta[["patient", "node", "x_coord", "y_coord"]].itertuples(index=False)
    ]
    labels = meta["tumor"].to_numpy(np.int64)
    sources = pd.Categorical([f"center_{c}" for c in meta["center"]])
    ds = SourceTaggedDataset(FileDataset(paths, labels, loader), sources, labels)
    ds.metadata = meta.reset_index(drop=True)
    return ds


def _has_index_column(path: Path) -> bool:
    with open(path) as f:
        head = f.readline().strip().split(",")
    return bool(head) and head[0] in ("", "Unnamed: 0")
