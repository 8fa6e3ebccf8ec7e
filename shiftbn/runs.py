"""Run folders: resolved config, environment, result cells written atomically, resume.

Layout of a run folder::

    config.json        the resolved configuration (a resumed run must match it)
    environment.json   versions, platform, device, threads, start time
    cells/<key>.csv    one tidy result table per completed cell (temp file, then rename)
    log.jsonl          one line per cell: computed or skipped, with its wall time
    results.csv        all cells combined (and results.parquet when pyarrow is installed)
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _umask_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask_mode(path: str) -> None:
    """Give a temp file the permissions a plain open() would (mkstemp makes it owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through a temp file and an atomic rename (``atomic_write_bytes``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def environment(seed: int | None = None) -> dict[str, Any]:
    """Versions, platform and device facts recorded with every run."""
    import numpy
    import sklearn

    from shiftbn._version import __version__

    return {
        "shiftbn": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "pandas": pd.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "device": "cpu",
        "torch_threads": torch.get_num_threads(), "seed": seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _slug(key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_")
    if not slug:
        raise ValueError(f"cell key {key!r} has no usable characters")
    return slug


class RunFolder:
    """A folder that holds one run's configuration and results, cell by cell.

    Why: long studies get interrupted; a resumed run must end with the same results as an
    uninterrupted one and recompute no finished cell. ``resume=False`` refuses a folder that already
    holds results; ``resume=True`` refuses one whose saved config differs from ``config``.
    """

    def __init__(self, path: str | Path, config: dict[str, Any], *, resume: bool = False) -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        saved = self.path / "config.json"
        if saved.exists():
            if not resume:
                raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                                      "another --out")
            previous = json.loads(saved.read_text())
            if previous != self.config:
                raise ValueError(f"{self.path} holds a run with a different configuration; resume it with the same "
                                 "arguments or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "cells").mkdir(exist_ok=True)
        atomic_write_text(saved, json.dumps(self.config, indent=2, sort_keys=True))
        atomic_write_text(self.path / "environment.json",
                          json.dumps(environment(self.config.get("seed")), indent=2))

    def cell_path(self, key: str) -> Path:
        return self.path / "cells" / f"{_slug(key)}.csv"

    def done(self, key: str) -> bool:
        return self.cell_path(key).exists()

    def cell(self, key: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """The cell's table: read back if complete, else computed, written atomically and logged."""
        path = self.cell_path(key)
        if path.exists():
            self._log(key, "skipped", 0.0)
            return pd.read_csv(path)
        t0 = time.perf_counter()
        table = compute()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"cell {key!r} must produce a DataFrame, got {type(table).__name__}")
        atomic_write_text(path, table.to_csv(index=False))
        self._log(key, "computed", time.perf_counter() - t0)
        return pd.read_csv(path)  # the same dtypes whether computed now or read back on resume

    def _log(self, key: str, status: str, seconds: float) -> None:
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps({"cell": key, "status": status, "seconds": round(seconds, 3)}) + "\n")

    def write_results(self, table: pd.DataFrame, name: str = "results") -> Path:
        """Write the combined tidy table as CSV (and Parquet when pyarrow is installed)."""
        out = self.path / f"{name}.csv"
        atomic_write_text(out, table.to_csv(index=False))
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            return out
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        atomic_write_bytes(self.path / f"{name}.parquet", buf.getvalue())
        return out
