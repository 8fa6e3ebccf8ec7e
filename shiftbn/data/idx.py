"""Reader for MNIST-format IDX files (``*-idx3-ubyte`` images, ``*-idx1-ubyte`` labels, optional .gz)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file into a numpy array of the shape its header declares.

    Why: MNIST-style datasets ship in this format (e.g. Debian's ``dataset-fashion-mnist``).

    Args:
        path: the file; a ``.gz`` suffix is decompressed.

    Returns:
        A numpy array of the declared shape and element type, native byte order, e.g.
        (N, 28, 28) uint8 for images or (N,) uint8 for labels.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not an IDX file, an unknown element type, a size that disagrees with the
            header, or a corrupt gzip stream.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     f = pathlib.Path(tmp) / "labels-idx1-ubyte.gz"
        ...     write_idx(f, np.array([3, 1, 4], dtype=np.uint8))
        ...     read_idx(f).tolist()
        [3, 1, 4]
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_DTYPES[code])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header declares {shape} but the file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped for ``.gz``; a broken gzip stream names the file."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as e:  # BadGzipFile is an OSError
        msg = f"{path}: cannot decompress ({e}); the file is truncated or corrupt, download it again"
        raise ValueError(msg) from None


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an unsigned-byte IDX file (the MNIST format).

    Why: tests and recipes build tiny MNIST-format folders for ``fashion_mnist_labs(root=...)``.

    Args:
        path: the file to write; a ``.gz`` suffix compresses it.
        array: any shape; cast to uint8 (values outside 0..255 wrap).

    Returns:
        None; the file holds the header and the bytes ``read_idx`` reads back.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     f = pathlib.Path(tmp) / "images-idx3-ubyte"
        ...     write_idx(f, np.zeros((2, 28, 28)))
        ...     read_idx(f).shape
        (2, 28, 28)
    """
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())
