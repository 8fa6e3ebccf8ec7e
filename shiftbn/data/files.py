"""Datasets backed by files on disk: manifests, image-folder trees, the WILDS Camelyon17 layout."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shiftbn.data._checks import encode_labels, rows
from shiftbn.data.images import IMAGE_SUFFIXES, FileDataset, load_image
from shiftbn.data.tagged import SourceTaggedDataset

__all__ = ["IMAGE_SUFFIXES", "FileDataset", "camelyon17", "from_folder", "from_frame", "load_image"]

DUPLICATES = ("error", "drop")


def _read_csv(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures name the file and the fix."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{what} {path} is empty; it needs a header line and one row per image") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.csv") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a CSV file; an image tree is read by from_folder") from None
    except pd.errors.ParserError as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"{what} {path} is not a readable CSV ({reason}); fix the file") from None


def _read_table(frame: pd.DataFrame | str | Path) -> tuple[pd.DataFrame, Path | None]:
    """The manifest table and the file it came from (None for a DataFrame); empty tables refused."""
    if isinstance(frame, pd.DataFrame):
        df, path = frame, None
    else:
        path = Path(frame)
        if not path.exists():
            raise FileNotFoundError(f"manifest not found: {path}")
        df = _read_parquet(path) if path.suffix == ".parquet" else _read_csv(path, "manifest")
    if len(df) == 0:
        raise ValueError(f"manifest {path or '(DataFrame)'} has no rows; list one image per row")
    return df, path


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install 'shiftbn[parquet]'") from e
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"manifest {path} is not a readable Parquet file ({e}); write it again") from None


def _resolve_paths(values: pd.Series, home: Path | None, allow_outside: bool, where: str) -> list[str]:
    """Absolute, normalised paths; relative ones resolve against ``home`` (else the working folder).

    Why: a manifest must not reach files outside its folder (``../../etc/passwd``). The check is
    lexical (``os.path.normpath``), so symlinks inside ``home`` that lead elsewhere are allowed.
    """
    missing = values.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{where}: empty path at {rows(missing)}; give every row an image path")
    top = os.path.abspath(home if home is not None else os.getcwd())
    out = [os.path.normpath(os.path.join(top, p)) for p in values.astype(str)]
    if home is not None and not allow_outside:
        outside = np.array([not _inside(p, top) for p in out])
        if outside.any():
            shown = [str(v) for v in values[outside].head(3)]
            raise ValueError(
                f"{where}: {int(outside.sum())} path(s) point outside {top}, e.g. {shown} at {rows(outside)}; "
                "move the files under that folder, pass root=<a folder that holds them>, or pass "
                "allow_outside=True (CLI: --allow-outside) if you trust this manifest"
            )
    return out


def _inside(path: str, top: str) -> bool:
    try:
        return os.path.commonpath([path, top]) == top
    except ValueError:  # different drives (Windows)
        return False


def _keep_first(paths: list[str], labels: np.ndarray, sources: pd.Series, duplicates: str, where: str) -> np.ndarray:
    """Row mask without repeats of one file (by resolved path); refuses or drops them per ``duplicates``.

    Why: a file listed twice can land in both the calibration and the test split, a leak.
    """
    key = pd.Series(paths)
    repeat = key.duplicated(keep="first").to_numpy()
    if not repeat.any():
        return ~repeat
    files = key[repeat].unique()
    examples = "; ".join(f"{f} at {rows(key.to_numpy() == f, limit=3)}" for f in files[:3])
    count = f"{len(files)} file(s) more than once ({int(repeat.sum())} extra row(s)), e.g. {examples}"
    if duplicates == "error":
        raise ValueError(
            f"{where} lists {count}: a repeated file can land in both the calibration and the test split (a leak); "
            "remove the repeated rows, or pass duplicates='drop' to keep each file's first row"
        )
    table = pd.DataFrame({"path": paths, "label": labels, "source": sources.astype(str).to_numpy()})
    conflict = table.groupby("path")[["label", "source"]].nunique().max(axis=1) > 1
    if conflict.any():
        raise ValueError(f"{where}: file(s) {list(conflict[conflict].index[:3])} are listed with different labels "
                         "or sources; fix the manifest (duplicates='drop' cannot choose between them)")
    warnings.warn(f"{where} lists {count}; dropped the repeats and kept each file's first row", stacklevel=3)
    return ~repeat


def from_frame(
    frame: pd.DataFrame | str | Path,
    *,
    path: str = "path",
    label: str | None = "label",
    source: str = "source",
    loader: Callable[[str], Any] = load_image,
    root: str | Path | None = None,
    allow_outside: bool = False,
    duplicates: str = "error",
) -> SourceTaggedDataset:
    """A dataset from a manifest table (DataFrame, CSV or Parquet file) with path, label, source columns.

    Why: the common layout of multi-site data (one row per image: file, label, site).
    Relative paths resolve against ``root`` (default: the manifest file's folder; for a DataFrame
    without ``root``, the working folder). With a manifest file or ``root``, paths that lead outside
    that folder are refused unless ``allow_outside=True``. A file listed twice is refused
    (``duplicates="error"``) or kept once with a warning (``duplicates="drop"``; rows that disagree on
    label or source still raise). Labels: class ids (ints or whole floats; -1 = unlabeled) or
    names, encoded in sorted order into ``ds.class_names``; a source whose label cells are all empty
    is unlabeled (-1); other missing or fractional labels raise naming their rows. ``label=None`` makes
    an unlabeled dataset. The other columns become ``ds.metadata`` (one row per sample). The
    ``source`` column's name is what the data calls a source: ``source="hospital"`` gives
    ``ds.source_word == "hospital"`` (reports say "hospital").

    Args:
        frame: a DataFrame, or the path of a CSV or Parquet manifest.
        path: the column of image paths (default ``"path"``).
        label: the column of labels, or ``None`` for unlabeled data (default ``"label"``).
        source: the column of sources (default ``"source"``).
        loader: ``loader(path)`` -> the input (default ``load_image``); called lazily per item.
        root: folder that relative paths resolve against (default: see above).
        allow_outside: accept paths outside that folder (default False).
        duplicates: ``"error"`` (default) or ``"drop"`` for files listed more than once.

    Returns:
        A ``SourceTaggedDataset`` over a ``FileDataset``; nothing is decoded until items are read.

    Raises:
        FileNotFoundError: no manifest file at ``frame``.
        ValueError: missing columns, empty or unreadable manifests, missing paths or sources, paths
            outside ``root``, repeated files, or bad labels; messages name rows and the fix.

    Example:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "label": ["cat", "dog", "cat"],
        ...                       "source": ["site1", "site1", "site2"], "scanner": ["x", "x", "y"]})
        >>> ds = from_frame(table, root="/data")
        >>> ds.class_names, ds.labels.tolist(), list(ds.metadata.columns)
        (('cat', 'dog'), [0, 1, 0], ['scanner'])
    """
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    df, file = _read_table(frame)
    where = f"manifest {file}" if file is not None else "manifest"
    missing = [c for c in (path, label, source) if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing}; it has {list(df.columns)}")
    home = Path(root) if root is not None else (file.parent if file is not None else None)
    paths = _resolve_paths(df[path], home, allow_outside, where)
    if label is None:
        labels, class_names = np.full(len(df), -1, dtype=np.int64), None
    else:
        labels, class_names = _frame_labels(df, label, source, where)
    no_source = df[source].isna().to_numpy()
    if no_source.any():
        raise ValueError(f"{where}, column {source!r}: missing source at {rows(no_source)}; give every row a source")
    keep = np.flatnonzero(_keep_first(paths, labels, df[source], duplicates, where))
    meta = df.drop(columns=[c for c in (path, label, source) if c is not None]).iloc[keep]
    files = FileDataset([paths[i] for i in keep], labels[keep], loader)
    return SourceTaggedDataset(files, df[source].to_numpy()[keep], labels[keep], class_names=class_names,
                               metadata=meta, source_word=_word(source))


def _frame_labels(df: pd.DataFrame, label: str, source: str, where: str) -> tuple[np.ndarray, tuple | None]:
    """Class ids and names of the ``label`` column; a source whose label cells are all empty is unlabeled (-1).

    Why: a new site arrives without labels, and its rows say so by leaving the label empty; an empty
    cell among a labeled source's rows is more likely a mistake and is still refused, naming its row.
    """
    blank = df[label].isna().to_numpy()
    whole = blank & df[source].map(pd.Series(blank).groupby(df[source].to_numpy()).all()).fillna(False).to_numpy(bool)
    labels = np.full(len(df), -1, dtype=np.int64)
    ids, names = encode_labels(df[label][~whole], int((~whole).sum()), where=f"{where}, column {label!r}")
    labels[~whole] = ids
    return labels, names


def _word(column: object) -> str:
    """A column name as a word for sentences: ``"Hospital_ID"`` -> ``"hospital id"`` (``"source"`` if empty)."""
    return " ".join(str(column).replace("_", " ").split()).lower() or "source"


def from_folder(root: str | Path, loader: Callable[[str], Any] = load_image) -> SourceTaggedDataset:
    """A dataset from an image tree ``root/<source>/<class>/<file>``; classes sorted by name.

    A source folder holding images and no class folders (``root/<source>/<file>``) is an unlabeled
    source: its samples get label -1 (statistics and label-free indicators, no label metric). Class
    ids are shared across sources (the union of class folder names, sorted) and named in
    ``ds.class_names``. Anything else in the tree (a file beside class folders in ``root/<source>/``, a
    non-image file or a sub-folder in a class folder) is skipped with one warning naming it;
    hidden entries (``.DS_Store``) are skipped silently. A broken (dangling or looping) symlink with an
    image suffix is kept as a file that cannot be read: loading it raises naming it, and
    ``shiftbn.data.loaders.find_unreadable`` lists it.

    Why: the torchvision ``ImageFolder`` layout with one more level for the source.

    Args:
        root: the tree's top folder.
        loader: ``loader(path)`` -> the input (default ``load_image``); called lazily per item.

    Returns:
        A ``SourceTaggedDataset`` over a ``FileDataset``, sources and classes named by their folders.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no image under ``root/<source>/<class>/``.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for site, cls in [("site1", "cat"), ("site1", "dog"), ("site2", "cat")]:
        ...     (pathlib.Path(tmp.name) / site / cls).mkdir(parents=True)
        ...     Image.new("L", (4, 4)).save(pathlib.Path(tmp.name) / site / cls / "0.png")
        >>> ds = from_folder(tmp.name)
        >>> ds.source_names, ds.class_names, tuple(ds[0][0].shape)
        (('site1', 'site2'), ('cat', 'dog'), (1, 4, 4))
        >>> tmp.cleanup()
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found, skipped = _walk(root)
    if skipped:
        shown = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"from_folder skipped {len(skipped)} entry(ies) under {root} that are not images in "
            f"root/<source>/<class>/: {shown}{more} (image suffixes: {', '.join(IMAGE_SUFFIXES)})",
            stacklevel=2,
        )
    if not found:
        raise ValueError(f"no images found under {root}; expected root/<source>/<class>/<image file>")
    df = pd.DataFrame(found, columns=["path", "source", "label"])
    classes = sorted(df["label"].dropna().unique())
    labels = df["label"].map({c: i for i, c in enumerate(classes)}).fillna(-1).to_numpy(np.int64)
    return SourceTaggedDataset(FileDataset(df["path"].tolist(), labels, loader), df["source"].to_numpy(), labels,
                               class_names=classes)


def _walk(root: Path) -> tuple[list[tuple[str, str, str]], list[Path]]:
    """Rows (path, source, class) of the images in ``root/<source>/<class>/``, and what else was there."""
    found: list[tuple[str, str, str]] = []
    skipped: list[Path] = []
    for src in _visible(root):
        if not src.is_dir():
            skipped.append(src)
            continue
        entries = _visible(src)
        if entries and not any(e.is_dir() for e in entries) and any(_is_image(f) for f in entries):
            # a source folder of images without class folders: an unlabeled source (label -1)
            found += [(str(f), src.name, None) for f in entries if _is_image(f)]
            skipped += [f for f in entries if not _is_image(f)]
            continue
        for cls in entries:
            if not cls.is_dir():
                skipped.append(cls)
                continue
            for f in _visible(cls):
                if _is_image(f):
                    found.append((str(f), src.name, cls.name))
                else:
                    skipped.append(f)
    return found, skipped


def _is_image(f: Path) -> bool:
    # a dangling or looping symlink named like an image is kept: it fails as an unreadable file
    # (CLI: listed in skipped.csv, refused under --strict) instead of vanishing among non-images
    return f.suffix.lower() in IMAGE_SUFFIXES and (f.is_file() or (f.is_symlink() and not f.exists()))


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


CAMELYON_CLASSES = ("normal", "tumor")
CAMELYON_COLUMNS = ["patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]


def camelyon17(root: str | Path, loader: Callable[[str], Any] = load_image) -> SourceTaggedDataset:
    """The WILDS Camelyon17 on-disk layout: ``root/metadata.csv`` and ``root/patches/...`` PNGs.

    Why: the hospital (``center``, 5 of them) is the textbook medical-imaging domain shift.
    Source = ``center`` (named ``center_<k>``), label = ``tumor`` (0/1, ``class_names`` ("normal",
    "tumor")). All metadata columns are kept on ``ds.metadata`` (a DataFrame, one row per sample).
    The unlabeled companion (WILDS ``camelyon17_unlabeled_v1.0``: no ``tumor`` column, or -1
    throughout) gives an unlabeled dataset, for statistics and label-free adaptation.

    Args:
        root: the ``camelyon17_v1.0`` folder.
        loader: ``loader(path)`` -> the input (default ``load_image``); called lazily per item.

    Returns:
        A ``SourceTaggedDataset`` over a ``FileDataset`` of the patches (decoded only when read).

    Raises:
        FileNotFoundError: ``root/metadata.csv`` is missing; says how to download the data.
        ValueError: ``metadata.csv`` lacks columns or holds bad labels.

    Example:
        >>> import tempfile, pandas as pd
        >>> tmp = tempfile.TemporaryDirectory()
        >>> pd.DataFrame({"patient": [4, 39], "node": [4, 1], "x_coord": [3328, 800], "y_coord": [21792, 640],
        ...               "tumor": [1, 0], "slide": [0, 1], "center": [0, 3], "split": [0, 0]}
        ...              ).to_csv(f"{tmp.name}/metadata.csv")
        >>> ds = camelyon17(tmp.name)
        >>> ds.source_names, ds.labels.tolist(), ds.class_names
        (('center_0', 'center_3'), [1, 0], ('normal', 'tumor'))
        >>> tmp.cleanup()
    """
    root = Path(root)
    meta_path = root / "metadata.csv"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found; download Camelyon17 with WILDS (wilds.get_dataset('camelyon17', "
            "download=True)) and pass its camelyon17_v1.0 folder as root"
        )
    meta = _read_csv(meta_path, "metadata file", index_col=0 if _has_index_column(meta_path) else None)
    missing = [c for c in CAMELYON_COLUMNS if c not in meta.columns and c != "tumor"]
    if missing:
        raise ValueError(f"{meta_path} lacks column(s) {missing}")
    paths = [
        str(root / "patches" / f"patient_{p:03d}_node_{n}" / f"patch_patient_{p:03d}_node_{n}_x_{x}_y_{y}.png")
        for p, n, x, y in meta[["patient", "node", "x_coord", "y_coord"]].itertuples(index=False)
    ]
    if "tumor" in meta.columns:
        labels, names = encode_labels(meta["tumor"], len(meta), CAMELYON_CLASSES,
                                      where=f"{meta_path}, column 'tumor'")
    else:
        labels, names = np.full(len(meta), -1, dtype=np.int64), CAMELYON_CLASSES
    sources = pd.Categorical([f"center_{c}" for c in meta["center"]])
    return SourceTaggedDataset(FileDataset(paths, labels, loader), sources, labels, class_names=names,
                               metadata=meta.reset_index(drop=True), source_word="center")


def _has_index_column(path: Path) -> bool:
    with open(path) as f:
        head = f.readline().strip().split(",")
    return bool(head) and head[0] in ("", "Unnamed: 0")
