"""Run folders: resolved config, numerics, environment, checksummed result cells, lock, resume.

Layout of a run folder::

    config.json        the resolved configuration (a resumed run must match it)
    run.json           folder format and the numerics (threads, device, dtype, ...) a resume must match
    environment.json   versions, platform, device, threads, start time (of the latest start)
    run.lock           flock held by the process filling the folder; holds its PID
    cells/<slug>-<hash>.csv  one tidy result table per completed cell: a checksum header line, then CSV
    log.jsonl          one line per cell: computed (with a note when recomputed) or skipped, wall time
    results.csv        all cells combined (and results.parquet when pyarrow is installed)
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from shiftbn._io import (
    FolderLock,
    LockedError,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temps,
)

__all__ = ["FORMAT", "LockedError", "RunFolder", "atomic_save_torch", "atomic_write_bytes", "atomic_write_text",
           "environment", "numerics"]

FORMAT = 2  # run-folder format; 1 = cells named by slug only, without checksums (before shiftbn 0.1.1)
_CELL_MAGIC = b"# shiftbn-cell "


def environment(seed: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions, platform and device facts recorded with every run; ``device``: the one computing."""
    import numpy
    import sklearn

    from shiftbn._version import __version__

    return {
        "shiftbn": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "pandas": pd.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "device": str(torch.device(device)),
        "torch_threads": torch.get_num_threads(), "seed": seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def numerics(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The process settings that change computed numbers; a resume must run under the same ones.

    Why: cells computed under two thread counts (reduction order), devices or default dtypes differ
    in their last digits, so a resumed table would mix two computations.
    """
    return {
        "device": str(torch.device(device)),
        "torch_threads": torch.get_num_threads(),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch": torch.__version__,
    }


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_.")[:80]


def _cell_name(key: str) -> str:
    """A unique file stem for ``key``: a readable slug plus 16 hex digits of the key's SHA-256.

    Why: slugging alone maps ``"site a"`` and ``"site/a"`` to one file; the hash keeps them apart and
    the exact key is stored in the cell's header, so a name maps back to its key.
    """
    if not isinstance(key, str):
        raise TypeError(f"cell key must be a str, got {type(key).__name__}")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{_slug(key) or 'cell'}-{digest}"


def _first_difference(saved: Any, now: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted key, saved value, current value) where two JSON values differ, else None."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in sorted(set(saved) | set(now), key=str):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved or k not in now:
                return where, saved.get(k, "<absent>"), now.get(k, "<absent>")
            diff = _first_difference(saved[k], now[k], where)
            if diff is not None:
                return diff
        return None
    return None if saved == now else (prefix or "<config>", saved, now)


def _encode_cell(key: str, table: pd.DataFrame) -> bytes:
    body = table.to_csv(index=False).encode()
    header = {"format": 1, "key": key, "rows": len(table), "sha256": hashlib.sha256(body).hexdigest()}
    return _CELL_MAGIC + json.dumps(header).encode() + b"\n" + body


def _decode_cell(data: bytes, key: str) -> tuple[pd.DataFrame | None, str]:
    """The cell's table and "" when the file is whole, else None and why it is not trusted."""
    head, sep, body = data.partition(b"\n")
    if not head.startswith(_CELL_MAGIC) or not sep:
        return None, "no checksum"
    try:
        meta = json.loads(head[len(_CELL_MAGIC):])
        expected, rows, stored_key = meta["sha256"], int(meta["rows"]), meta["key"]
    except (ValueError, KeyError, TypeError):
        return None, "unreadable checksum header"
    if stored_key != key:
        raise RuntimeError(f"cell file for {key!r} holds cell {stored_key!r} (hash clash); "
                           "rename the key or start a new run folder")
    if hashlib.sha256(body).hexdigest() != expected:
        return None, "checksum mismatch"
    table = pd.read_csv(io.BytesIO(body)) if body.strip() else pd.DataFrame()
    if len(table) != rows:
        return None, "row count mismatch"
    return table, ""


class RunFolder:
    """A folder that holds one run's configuration and results, cell by cell.

    Why: long studies get interrupted; a resumed run must end with the same results as an
    uninterrupted one and recompute no finished cell. ``resume=False`` refuses a folder that already
    holds results; ``resume=True`` refuses one whose saved config or numerics (``numerics(device)``:
    thread count, device, default dtype, ...) differ, naming the key. Cells carry a checksum; a
    damaged cell is recomputed, never trusted; temp files of a killed writer (``.<name>.<pid>.*.tmp``
    whose process is gone) are removed when the folder is opened. The folder is locked (``run.lock``) for this process
    until ``close()`` (or the end of a ``with`` block, or the process).
    ``device``: where the cells are computed, recorded in ``environment.json`` and the numerics.
    """

    def __init__(self, path: str | Path, config: dict[str, Any], *, resume: bool = False,
                 device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        self.device = str(torch.device(device))
        self.numerics = numerics(self.device)
        self._computed: set[str] | None = None
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder; choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise FileExistsError(f"cannot create run folder {self.path}: a parent is a file; "
                                  "choose another --out") from None
        self._lock = FolderLock(self.path)
        self._lock.acquire()  # before the checks below: check-and-write is atomic between processes
        try:
            self._open(resume)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, resume: bool) -> None:
        saved = self.path / "config.json"
        if saved.exists():
            if not resume:
                raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                                      "another --out")
            self._check_resume(saved)
        else:
            atomic_write_text(self.path / "run.json", json.dumps({"format": FORMAT, "numerics": self.numerics},
                                                                 indent=2, sort_keys=True))
            atomic_write_text(saved, json.dumps(self.config, indent=2, sort_keys=True))  # last: the run exists
        (self.path / "cells").mkdir(exist_ok=True)  # after the checks: a refused folder gains only run.lock
        for folder in (self.path, self.path / "cells"):  # a killed writer's temp files; the lock is ours
            remove_stale_temps(folder)
        atomic_write_text(self.path / "environment.json",
                          json.dumps(environment(self.config.get("seed"), self.device), indent=2))

    def _check_resume(self, saved: Path) -> None:
        meta_path = self.path / "run.json"
        if not meta_path.exists():
            raise ValueError(f"{self.path} was written by an older shiftbn (run-folder format 1: cells without "
                             "checksums) and cannot be resumed safely; start a new run in another --out")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} has run-folder format {meta.get('format')!r}, this shiftbn writes "
                             f"{FORMAT}; start a new run in another --out")
        diff = _first_difference(json.loads(saved.read_text()), self.config)
        if diff is not None:
            raise ValueError(f"{self.path} holds a run with a different configuration: {diff[0]} was {diff[1]!r}, "
                             f"now {diff[2]!r}; resume it with the same arguments or choose another --out")
        diff = _first_difference(meta.get("numerics", {}), self.numerics)
        if diff is not None:
            raise ValueError(f"{self.path} was computed with different numerics: {diff[0]} was {diff[1]!r}, now "
                             f"{diff[2]!r}; resume under the same settings (threads: OMP_NUM_THREADS or "
                             "torch.set_num_threads) or choose another --out")

    def close(self) -> None:
        """Release the folder's lock; the folder stays as it is. Safe to call twice."""
        self._lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._lock.locked:
            raise ValueError(f"run folder {self.path} is closed; open it again with resume=True")

    def cell_path(self, key: str) -> Path:
        """Where the cell ``key`` is stored (unique per exact key)."""
        return self.path / "cells" / f"{_cell_name(key)}.csv"

    def _read(self, key: str) -> tuple[pd.DataFrame | None, str]:
        path = self.cell_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, "missing"
        return _decode_cell(data, key)

    def done(self, key: str) -> bool:
        """Whether the cell is stored whole (its checksum and row count verified)."""
        return self._read(key)[0] is not None

    def cell(self, key: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """The cell's table: read back if stored whole, else computed, written atomically and logged."""
        self._check_open()
        table, why = self._read(key)
        if table is not None:
            if key not in self._logged_computed():
                # killed after the cell's atomic write and before its log line: the cell is whole
                self._log(key, "computed", 0.0, "log line recovered: the run stopped before logging this cell")
            self._log(key, "skipped", 0.0)
            return table
        t0 = time.perf_counter()
        return self.store(key, compute(), time.perf_counter() - t0, why)

    def store(self, key: str, table: pd.DataFrame, seconds: float, why: str | None = None) -> pd.DataFrame:
        """Write a cell computed elsewhere (another rank) atomically and log it; returns the table as read
        back. ``seconds``: its compute time; ``why``: why the stored cell was not trusted (``_read``'s
        reason; looked up when ``None``)."""
        self._check_open()
        if why is None:
            why = self._read(key)[1]
        note = "" if why in ("", "missing") else f"recomputed: {why}"
        if note:
            warnings.warn(f"cell {key!r} in {self.path} is damaged ({why}); recomputing it", RuntimeWarning,
                          stacklevel=3)
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"cell {key!r} must produce a DataFrame, got {type(table).__name__}")
        data = _encode_cell(key, table)
        atomic_write_bytes(self.cell_path(key), data)
        self._log(key, "computed", seconds, note)
        table, why = _decode_cell(data, key)  # the same dtypes whether computed now or read back on resume
        if table is None:
            raise RuntimeError(f"cell {key!r} does not read back ({why}); its table cannot round-trip CSV")
        return table

    def _logged_computed(self) -> set[str]:
        """Keys with a "computed" line in ``log.jsonl`` (read once, then kept up to date)."""
        if self._computed is None:
            self._computed = set()
            path = self.path / "log.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(entry, dict) and entry.get("status") == "computed":
                    self._computed.add(entry.get("cell"))
        return self._computed

    def _log(self, key: str, status: str, seconds: float, note: str = "") -> None:
        entry = {"cell": key, "status": status, "seconds": round(seconds, 3)}
        if note:
            entry["note"] = note
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if status == "computed":
            self._logged_computed().add(key)

    def write_results(self, table: pd.DataFrame, name: str = "results") -> Path:
        """Write the combined tidy table as CSV (and Parquet when pyarrow is installed)."""
        self._check_open()
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
