"""Segmentation data on disk: NIfTI volumes and 2-D image + mask pairs, by folder or manifest.

Why: multi-site segmentation data comes as files (NIfTI from scanners and challenges, PNG pairs
for 2-D), one folder or one manifest row per case; items are decoded only when read, and a mask
that does not fit its image is refused naming both files.
"""

from __future__ import annotations

import gzip
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from shiftbn._io import atomic_write_bytes, atomic_write_text
from shiftbn.data._checks import UNLABELED, rows
from shiftbn.data.files import _read_table, _resolve_paths, _word
from shiftbn.data.images import IMAGE_SUFFIXES, load_image
from shiftbn.data.tagged import SourceTaggedDataset

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CLASSES_FILE = "classes.txt"
_NIBABEL_HINT = "pip install nibabel (or pip install shiftbn[nifti])"


def _nibabel():
    try:
        import nibabel
    except ImportError as e:
        raise ImportError(f"reading and writing NIfTI files needs nibabel: {_NIBABEL_HINT}") from e
    return nibabel


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case).

    Why: ``.nii.gz`` is one suffix for matching images with masks, not ``.gz`` after a stem ``x.nii``.

    Args:
        path: a file path.

    Returns:
        True for ``.nii``/``.nii.gz`` names.

    Example:
        >>> is_nifti("case_01.nii.gz"), is_nifti("case_01.png")
        (True, False)
    """
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _stem(path: Path) -> str:
    """The file name without its suffix; ``.nii.gz`` counts as one suffix."""
    name = path.name
    return name[:-7] if name.lower().endswith(".nii.gz") else path.stem


def _readable_suffix(path: Path) -> bool:
    return is_nifti(path) or path.suffix.lower() in IMAGE_SUFFIXES


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The voxel array of a NIfTI file as stored (nibabel's axis order) and its spacing from the header.

    Why: spacing makes surface distances (HD95) millimetres; nibabel is the standard reader (MONAI's
    ``LoadImage`` uses it). Scaling (``scl_slope``/``scl_inter``) is applied as nibabel does.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(array, spacing)``: the data (any dtype, nibabel's array order) and ``header.get_zooms()`` for
        its first three (or fewer) axes, in mm, the same order.

    Raises:
        ImportError: nibabel is missing (says how to install it).
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read as NIfTI (names it).

    Example:
        >>> import tempfile, nibabel
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2., 1., 1., 1.])),
        ...                  f"{tmp}/a.nii.gz")
        ...     arr, spacing = read_nifti(f"{tmp}/a.nii.gz")
        >>> arr.shape, spacing
        ((4, 5, 6), (2.0, 1.0, 1.0))
    """
    nib = _nibabel()
    if not Path(path).exists():
        raise FileNotFoundError(f"NIfTI file not found: {path}; fix its path or remove it")
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
        zooms = img.header.get_zooms()
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise ValueError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}; remove or re-save it") from None
    spatial = min(arr.ndim, 3)
    return np.asarray(arr), tuple(float(z) for z in zooms[:spatial])


def _image(path: str, loader: Callable[[str], Any]) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    """An image file as float32 (C, *spatial) and its spacing (None for 2-D image files)."""
    if not is_nifti(path):
        return torch.as_tensor(loader(path)), None
    arr, spacing = read_nifti(path)
    if arr.ndim == 4:  # (X, Y, Z, C): channels last, as MONAI reads them
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim in (2, 3):
        arr = arr[None]
    else:
        raise ValueError(f"NIfTI image {path} has {arr.ndim} axes {arr.shape}; expected 2-D or 3-D (a 4th axis "
                         "holds channels)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), spacing


def _mask_array(path: str) -> np.ndarray:
    """A mask file's label values as stored (no scaling to [0, 1])."""
    if is_nifti(path):
        arr, _ = read_nifti(path)
        return arr[..., 0] if arr.ndim == 4 and arr.shape[-1] == 1 else arr
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
                raise ValueError(f"mask {path} is a colour image (mode {im.mode}); save the label map as a "
                                 "single-channel (grayscale or palette) PNG holding class ids 0..K-1")
            return np.asarray(im)  # "P" gives palette indices: the class ids of VOC-style masks
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}; fix its path or remove it") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode mask {path}: {e}; remove or re-save it") from e


class SegFileDataset(Dataset):
    """Image/mask file pairs read lazily: item ``i`` is ``(image, target)``.

    Why: segmentation data is files; decoding happens per item, never at load. ``target`` is the
    mask as int64 (*spatial) for 2-D image files, ``{"mask": ..., "spacing": float64 (ndim,)}`` for
    NIfTI (spacing from the image header, mm, in array order), and ``-1`` (unlabeled) when the
    pair has no mask. Exposes no ``targets`` (there is no class id per case).

    Args:
        images: N image paths.
        masks: N mask paths (``None`` for an unlabeled case).
        loader: ``loader(path)`` -> float tensor (C, H, W) for 2-D image files (default ``load_image``);
            NIfTI images are read as stored (float32).
        num_classes: label values must be < this (default: unchecked).

    Returns:
        A map-style dataset of N items.

    Raises:
        ValueError: (on reading) a mask whose spatial shape differs from its image, a mask with
            values that are not whole numbers >= 0 (or >= ``num_classes``); names both files.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> Image.new("L", (4, 3), 200).save(f"{tmp.name}/a.png"); Image.new("L", (4, 3), 1).save(f"{tmp.name}/m.png")
        >>> x, y = SegFileDataset([f"{tmp.name}/a.png"], [f"{tmp.name}/m.png"])[0]
        >>> tuple(x.shape), y.dtype, y.unique().tolist()
        ((1, 3, 4), torch.int64, [1])
        >>> tmp.cleanup()
    """

    def __init__(self, images: Sequence[str], masks: Sequence[str | None], loader: Callable[[str], Any] = load_image,
                 num_classes: int | None = None) -> None:
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images and {len(masks)} masks; give one mask (or None) per image")
        self.images = [str(p) for p in images]
        self.masks = [None if m is None else str(m) for m in masks]
        self.loader = loader
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image_path, mask_path = self.images[i], self.masks[i]
        x, spacing = _image(image_path, self.loader)
        if mask_path is None:
            return x, UNLABELED
        mask = self._mask(mask_path, image_path, tuple(x.shape[1:]))
        if spacing is None:
            return x, mask
        return x, {"mask": mask, "spacing": torch.tensor(spacing[:mask.ndim], dtype=torch.float64)}

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, Any]]:
        """The items at ``indices`` (one batch): images of two spatial shapes are refused naming both files,
        where torch's collation would only say that tensors differ."""
        items = [self[int(i)] for i in indices]
        for (x, _), i in zip(items[1:], indices[1:], strict=True):
            if x.shape[1:] != items[0][0].shape[1:]:
                raise ValueError(f"one batch holds images {self.images[int(indices[0])]} "
                                 f"{tuple(items[0][0].shape[1:])} and {self.images[int(i)]} {tuple(x.shape[1:])}, "
                                 f"which cannot be stacked; {SHAPE_FIX}")
        return items

    def spatial_shape(self, i: int) -> tuple[int, ...] | None:
        """The spatial shape of image ``i`` read from its NIfTI header alone (no voxel is decoded).

        Why: checking that a source's volumes share one shape, before any pass, must not decode them.

        Args:
            i: the item's position.

        Returns:
            The spatial axes' sizes (a 4th, channel axis left out), or ``None`` for a 2-D image file,
            whose shape the loader (a transform) may change.

        Raises:
            ValueError: the header cannot be read (names the file).

        Example:
            >>> import tempfile, nibabel
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), f"{tmp}/a.nii.gz")
            ...     SegFileDataset([f"{tmp}/a.nii.gz"], [None]).spatial_shape(0)
            (4, 5, 6)
        """
        if not is_nifti(self.images[i]):
            return None
        try:
            shape = tuple(int(n) for n in _nibabel().load(self.images[i]).shape)
        except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a bad file
            raise ValueError(f"cannot read NIfTI file {self.images[i]}: {type(e).__name__}: {e}; remove or re-save "
                             "it") from None
        return shape[:3] if len(shape) == 4 else shape

    def _mask(self, mask_path: str, image_path: str, spatial: tuple[int, ...]) -> torch.Tensor:
        arr = _mask_array(mask_path)
        pair = f"mask {mask_path} (for image {image_path})"
        if tuple(arr.shape) != spatial:
            raise ValueError(f"{pair} has spatial shape {tuple(arr.shape)} but the image has {spatial}; a mask must "
                             "label every voxel of its image: resample one onto the other or fix the pairing")
        if arr.dtype.kind == "b":
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind != "f":
                raise ValueError(f"{pair} holds {arr.dtype} values; a mask holds class ids 0..K-1")
            bad = ~np.isfinite(arr) | (arr != np.round(arr))
            if bad.any():
                raise ValueError(f"{pair} is not integer-valued: it holds values such as "
                                 f"{np.unique(arr[bad])[:3].tolist()}; a mask holds class ids 0..K-1 (an "
                                 "interpolated or probability map must be thresholded first)")
        arr = arr.astype(np.int64)
        if arr.size and arr.min() < 0:
            raise ValueError(f"{pair} holds negative values such as {int(arr.min())}; a mask holds class ids 0..K-1")
        if self.num_classes is not None and arr.size and arr.max() >= self.num_classes:
            raise ValueError(f"{pair} holds class id {int(arr.max())}, but there are {self.num_classes} classes "
                             f"(class_names); add the class to {CLASSES_FILE} / class_names or fix the mask")
        return torch.from_numpy(arr)


SHAPE_FIX = ("use batch size 1 (batch_size=1, stats_batch_size=1) so that each batch holds one case, or resample or "
             "crop the volumes to one shape")
"""What to do about images of two shapes in one batch (the CLI reads ``batch_size=1`` as ``--batch-size 1``)."""


def check_one_shape(ds: SourceTaggedDataset, fix: str, pooled: Sequence[str] = (), pooled_fix: str = "") -> None:
    """``ValueError`` naming the first two NIfTI images of one source with different spatial shapes, and ``fix``.

    Why: a source's cases are batched together, and torch's collation of two shapes fails deep in a pass
    with a message that names no file; NIfTI headers give every shape without decoding a voxel, so the
    check costs one header read per case. 2-D image files and datasets not read from files pass.

    Args:
        ds: a ``SourceTaggedDataset`` (over a ``SegFileDataset`` for anything to be checked).
        fix: the end of the message: what the caller can change.
        pooled: sources batched together as well (``precise`` pools the training sources in mixed batches).
        pooled_fix: the end of the message for two shapes among ``pooled``.

    Raises:
        ValueError: a source (or two of ``pooled``) holds volumes of two shapes (names them, both files and
            shapes).
    """
    base = getattr(ds, "base", None)
    if not isinstance(base, SegFileDataset):
        return
    first: dict[int, tuple[str, tuple[int, ...]]] = {}
    for i, sid in enumerate(ds.source_ids.tolist()):
        shape = base.spatial_shape(i)
        if shape is None:
            continue
        if sid not in first:
            first[sid] = (base.images[i], shape)
        elif shape != first[sid][1]:
            path, seen = first[sid]
            raise ValueError(f"{ds.source_word} {ds.source_names[sid]!r} holds volumes of two shapes: {path} {seen} "
                             f"and {base.images[i]} {shape}; its cases are batched together, so {fix}")
    together = [(ds.source_names[sid], *first[sid]) for sid in sorted(first) if ds.source_names[sid] in set(pooled)]
    for name, path, shape in together[1:]:
        if shape != together[0][2]:
            raise ValueError(f"{ds.source_word}s {together[0][0]!r} and {name!r} hold volumes of two shapes: "
                             f"{together[0][1]} {together[0][2]} and {path} {shape}; precise pools them in mixed "
                             f"batches, so {pooled_fix}")


def _class_names(class_names: Sequence[str] | None, folder: Path | None) -> tuple[str, ...] | None:
    """``class_names`` as given, else the lines of ``folder/classes.txt`` when it exists, else None."""
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
    elif folder is not None and (folder / CLASSES_FILE).is_file():
        names = tuple(line.strip() for line in (folder / CLASSES_FILE).read_text().splitlines() if line.strip())
    else:
        return None
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"class_names must be two or more distinct names (background first), got {list(names)}")
    return names


def from_seg_folder(root: str | Path, *, class_names: Sequence[str] | None = None,
                    loader: Callable[[str], Any] = load_image) -> SourceTaggedDataset:
    """Segmentation data from ``root/<source>/images/*`` and ``root/<source>/masks/*``, paired by file name.

    Why: the usual layout of multi-site segmentation data (one folder per site). Images and masks
    pair by name without suffix (``.nii.gz`` is one suffix: ``case1.nii.gz`` pairs with
    ``case1.nii.gz`` or ``case1.png``). A source with ``images/`` and no ``masks/`` folder is
    **unlabeled**: its items carry target -1 (for statistics and label-free adaptation). Files are
    decoded only when an item is read; a mask that does not fit its image is refused then, naming
    both files. Items: ``(image, target, source_id)`` with image float32 (C, *spatial) and target
    as ``SegFileDataset`` describes (a label map, ``{"mask", "spacing"}`` for NIfTI, or -1).

    Args:
        root: the top folder.
        class_names: names of label values 0..K-1, background first (default: the lines of
            ``root/classes.txt`` when present, else None: K is then unknown until masks are read).
        loader: ``loader(path)`` -> float tensor (C, H, W) for 2-D image files (default ``load_image``).

    Returns:
        A ``SourceTaggedDataset`` over a ``SegFileDataset``; ``labels`` None; ``metadata`` with columns
        ``case``, ``image``, ``mask`` (paths; mask empty for unlabeled cases).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no ``<source>/images/`` folder, an image without a mask or a mask without an image
            in a labeled source (names the file and how to fix it), two files with one name.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = write_seg_folder(sb.load("seg-sites-2d", n=2, size=16, sites=2), tmp.name, format="png")
        >>> ds = from_seg_folder(path)
        >>> ds.source_names, ds.class_names, tuple(ds[0][1].shape)
        (('site_a', 'site_b'), ('background', 'organ', 'lesion'), (16, 16))
        >>> tmp.cleanup()
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation folder not found: {root}")
    sources = [p for p in _visible(root) if p.is_dir() and (p / "images").is_dir()]
    if not sources:
        raise ValueError(f"no <source>/images/ folder under {root}; expected root/<source>/images/<file> and "
                         "root/<source>/masks/<file> (masks/ left out for an unlabeled source)")
    rows_: list[tuple[str, str, str | None, str]] = []
    for src in sources:
        images = _files_by_stem(src / "images")
        if not (src / "masks").is_dir():
            rows_ += [(stem, path, None, src.name) for stem, path in images.items()]
            continue
        masks = _files_by_stem(src / "masks")
        for stem, path in images.items():
            if stem not in masks:
                raise ValueError(f"image {path} has no mask in {src / 'masks'} (looked for {stem}.<suffix>); add "
                                 f"the mask, remove the image, or remove {src / 'masks'} to read source "
                                 f"{src.name!r} as unlabeled")
            rows_.append((stem, path, masks[stem], src.name))
        extra = sorted(set(masks) - set(images))
        if extra:
            raise ValueError(f"mask {masks[extra[0]]} has no image in {src / 'images'} (and {len(extra) - 1} more); "
                             "add the image or remove the mask")
    names = _class_names(class_names, root)
    df = pd.DataFrame(rows_, columns=["case", "image", "mask", "source"])
    files = SegFileDataset([r[1] for r in rows_], [r[2] for r in rows_], loader, None if names is None else len(names))
    return SourceTaggedDataset(files, df["source"].to_numpy(), class_names=names,
                               metadata=df[["case", "image", "mask"]].fillna(""))


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _files_by_stem(folder: Path) -> dict[str, str]:
    """Image files of ``folder`` by stem; other files skipped with a warning; a stem twice refused."""
    out: dict[str, str] = {}
    skipped = []
    for p in _visible(folder):
        if not (p.is_file() and _readable_suffix(p)):
            skipped.append(p.name)
            continue
        stem = _stem(p)
        if stem in out:
            raise ValueError(f"{out[stem]} and {p} have the same name {stem!r}, so masks cannot be paired by name; "
                             "rename or remove one")
        out[stem] = str(p)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} entry(ies) in {folder} that are not image or NIfTI files: "
                      f"{', '.join(skipped[:5])}", stacklevel=3)
    return out


def from_seg_frame(frame: pd.DataFrame | str | Path, *, image: str = "image", mask: str = "mask",
                   source: str = "source", class_names: Sequence[str] | None = None, root: str | Path | None = None,
                   allow_outside: bool = False, loader: Callable[[str], Any] = load_image) -> SourceTaggedDataset:
    """Segmentation data from a manifest with one row per case: ``image, mask, source`` columns.

    Why: a table of cases is the other common layout (and lets sites share folders). Relative paths
    resolve against ``root`` (default: the manifest's folder); paths leading outside it are refused
    unless ``allow_outside=True``. Every row needs a mask (an unlabeled source is read with the
    folder layout, ``from_seg_folder``, without ``masks/``). Files are decoded only when read.

    Args:
        frame: a DataFrame, or the path of a CSV or Parquet manifest.
        image: the column of image paths (default ``"image"``).
        mask: the column of mask paths (default ``"mask"``).
        source: the column of sources; its name is the data's word for a source (default ``"source"``).
        class_names: names of label values 0..K-1 (default: the lines of ``classes.txt`` next to the
            manifest when present, else None).
        root: folder that relative paths resolve against (default: see above).
        allow_outside: accept paths outside that folder (default False).
        loader: ``loader(path)`` -> float tensor (C, H, W) for 2-D image files (default ``load_image``).

    Returns:
        A ``SourceTaggedDataset`` over a ``SegFileDataset``; the manifest's other columns are ``metadata``.

    Raises:
        FileNotFoundError: no manifest at ``frame``.
        ValueError: missing columns, a row without a mask or source (names the row and image), a file
            listed twice, paths outside ``root``.

    Example:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"image": ["a.nii.gz", "b.nii.gz"], "mask": ["a_seg.nii.gz", "b_seg.nii.gz"],
        ...                       "source": ["site1", "site2"]})
        >>> ds = from_seg_frame(table, root="/data", class_names=["background", "tumour"])
        >>> ds.source_names, ds.labels, ds.base.masks[0]
        (('site1', 'site2'), None, '/data/a_seg.nii.gz')
    """
    df, file = _read_table(frame)
    where = f"manifest {file}" if file is not None else "manifest"
    missing = [c for c in (image, mask, source) if c not in df.columns]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing}; a segmentation manifest has columns {image}, {mask}, "
                         f"{source}; it has {list(df.columns)}")
    home = Path(root) if root is not None else (file.parent if file is not None else None)
    images = _resolve_paths(df[image], home, allow_outside, f"{where}, column {image!r}")
    no_mask = df[mask].isna().to_numpy() | (df[mask].astype(str).str.strip() == "").to_numpy()
    if no_mask.any():
        first = images[int(np.flatnonzero(no_mask)[0])]
        raise ValueError(f"{where}: image {first} has no mask ({int(no_mask.sum())} row(s) without one, at "
                         f"{rows(no_mask)}); give its mask path, remove the row, or read an unlabeled source with "
                         "the folder layout root/<source>/images/ (no masks/)")
    masks = _resolve_paths(df[mask], home, allow_outside, f"{where}, column {mask!r}")
    no_source = df[source].isna().to_numpy()
    if no_source.any():
        raise ValueError(f"{where}, column {source!r}: missing source at {rows(no_source)}; give every row a source")
    for column, paths in ((image, images), (mask, masks)):
        repeat = pd.Series(paths).duplicated().to_numpy()
        if repeat.any():
            raise ValueError(f"{where}, column {column!r}: {paths[int(np.flatnonzero(repeat)[0])]} is listed more "
                             f"than once (at {rows(repeat)}); a repeated case can land in two splits, remove it")
    names = _class_names(class_names, file.parent if file is not None else None)
    files = SegFileDataset(images, masks, loader, None if names is None else len(names))
    meta = df.drop(columns=[image, mask, source])
    return SourceTaggedDataset(files, df[source].to_numpy(), class_names=names, metadata=meta,
                               source_word=_word(source))


def seg_layout(path: str | Path) -> str | None:
    """Which segmentation layout ``path`` holds: ``"folder"``, ``"manifest"``, or None (not segmentation).

    Why: the CLI's ``--data`` takes a classification tree or manifest too; a folder is segmentation
    when every sub-folder of a source is ``images`` or ``masks`` (and some source has ``images``), a
    manifest when it has ``image`` and ``mask`` columns. Reads only names and the manifest's header.

    Args:
        path: a folder or a manifest file.

    Returns:
        ``"folder"``, ``"manifest"`` or None.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (pathlib.Path(tmp) / "site1" / "images").mkdir(parents=True)
        ...     seg_layout(tmp)
        'folder'
    """
    path = Path(path)
    if path.is_dir():
        subs = [[c.name for c in _visible(s) if c.is_dir()] for s in _visible(path) if s.is_dir()]
        seg = any("images" in s for s in subs) and all(set(s) <= {"images", "masks"} for s in subs)
        return "folder" if seg else None
    if path.is_file():
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                columns = pq.read_schema(path).names
            else:
                columns = pd.read_csv(path, nrows=0).columns
        except Exception:  # noqa: BLE001 - not readable here: the classification reader names the problem
            return None
        return "manifest" if {"image", "mask"} <= set(columns) else None
    return None


def write_seg_folder(ds: SourceTaggedDataset, root: str | Path, format: str = "nifti") -> Path:
    """Write a segmentation dataset to ``root/<source>/images/<case>`` and ``.../masks/<case>`` (+ ``classes.txt``).

    Why: generated sets on disk test the file readers, show the CLI on NIfTI data and give a
    starting layout. ``format="nifti"``: ``.nii.gz`` files holding the image (C == 1 squeezed; more
    channels go last) and the mask (uint8/int16), the spacing in the header (the target's
    ``"spacing"``, else 1 mm). ``format="png"`` (2-D only): masks as 8-bit PNGs of class ids; images
    as 16-bit grayscale PNGs, mapped to [0, 1] by one linear map for the whole dataset (its min and
    max), so the differences between sources survive. Each file is written atomically.
    Case names: ``metadata["case"]`` when present, else the item's position.

    Args:
        ds: a segmentation ``SourceTaggedDataset`` (items ``(image, mask or {"mask", "spacing"}, s)``).
        root: the folder to write (created; existing files of the same names are replaced).
        format: ``"nifti"`` (default) or ``"png"``.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: an unknown ``format``, PNG for 3-D data, an item without a mask, repeated case names.
        ImportError: ``format="nifti"`` without nibabel.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = write_seg_folder(sb.load("seg-sites-3d", n=1, size=8, sites=2), tmp)
        ...     sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))[:2]
        ['site_a/images/site_a_000.nii.gz', 'site_a/masks/site_a_000.nii.gz']
    """
    if format not in ("nifti", "png"):
        raise ValueError(f"format must be 'nifti' or 'png', got {format!r}")
    root = Path(root)
    nib = _nibabel() if format == "nifti" else None
    cases = ds.metadata["case"].astype(str).tolist() if ds.metadata is not None and "case" in ds.metadata else \
        [f"{i:05d}" for i in range(len(ds))]
    if len(set(cases)) != len(cases):
        raise ValueError("case names (metadata['case']) repeat; they name the files, so they must be distinct")
    lo, hi = _range(ds) if format == "png" else (0.0, 1.0)
    for i in range(len(ds)):
        x, target, s = ds[i]
        mask, spacing = _split_target(target, i)
        x = torch.as_tensor(x).detach().cpu()
        folder = root / ds.source_names[s]
        if format == "nifti":
            _write_nifti_pair(nib, folder, cases[i], x, mask, spacing)
        else:
            _write_png_pair(folder, cases[i], x, mask, lo, hi)
    if ds.class_names is not None:
        atomic_write_text(root / CLASSES_FILE, "".join(f"{c}\n" for c in ds.class_names))
    return root


def _split_target(target: Any, i: int) -> tuple[np.ndarray, tuple[float, ...] | None]:
    if isinstance(target, dict):
        return np.asarray(target["mask"]), tuple(float(v) for v in torch.as_tensor(target["spacing"]).tolist())
    if isinstance(target, (torch.Tensor, np.ndarray)) and np.ndim(target) >= 2:
        return np.asarray(target), None
    raise ValueError(f"item {i} has target {target!r}, not a mask; write_seg_folder writes labeled segmentation data")


def _range(ds: SourceTaggedDataset) -> tuple[float, float]:
    lo, hi = np.inf, -np.inf
    for i in range(len(ds)):
        x = torch.as_tensor(ds[i][0])
        if x.ndim != 3:
            raise ValueError(f"format='png' writes 2-D images (C, H, W); item {i} has shape {tuple(x.shape)}: "
                             "use format='nifti'")
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return lo, hi if hi > lo else lo + 1.0


def _write_nifti_pair(nib, folder: Path, case: str, x: torch.Tensor, mask: np.ndarray,
                      spacing: tuple[float, ...] | None) -> None:
    arr = x.numpy().astype(np.float32)
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    ndim = mask.ndim
    sp = spacing if spacing is not None else (1.0,) * ndim
    affine = np.diag([*sp, *([1.0] * (3 - ndim)), 1.0])
    m = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int16)
    for sub, data in (("images", arr), ("masks", m)):
        img = nib.Nifti1Image(data, affine)
        img.header.set_zooms(tuple(sp) + tuple(img.header.get_zooms()[ndim:]))
        atomic_write_bytes(folder / sub / f"{case}.nii.gz", gzip.compress(img.to_bytes(), mtime=0))


def _write_png_pair(folder: Path, case: str, x: torch.Tensor, mask: np.ndarray, lo: float, hi: float) -> None:
    from PIL import Image

    if x.shape[0] != 1:
        raise ValueError(f"format='png' writes one-channel images; case {case} has {x.shape[0]} channels")
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"format='png' writes class ids 0..255; case {case} has ids outside that range")
    scaled = np.round((x[0].numpy().astype(np.float64) - lo) / (hi - lo) * 65535).astype(np.uint16)
    for sub, im in (("images", Image.fromarray(scaled)), ("masks", Image.fromarray(mask.astype(np.uint8)))):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        atomic_write_bytes(folder / sub / f"{case}.png", buf.getvalue())
