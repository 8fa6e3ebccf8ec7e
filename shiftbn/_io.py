"""Atomic file writes and an inter-process folder lock: the bottom layer every module may import.

Why: a result file is either the old one or the whole new one, never half written, whatever
layer writes it; and two processes must never fill one run folder at once. Imports only the
standard library (torch lazily, for ``atomic_save_torch``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FolderLock", "LockedError", "atomic_save_torch", "atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
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
    _fsync_dir(path.parent)


def _umask_mode(path: str) -> None:
    """Give a temp file the permissions a plain open() would (mkstemp makes it owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def atomic_save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through a temp file and an atomic rename (``atomic_write_bytes``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class LockedError(RuntimeError):
    """Another process holds the lock; ``pid`` is the holder's process id (None when unknown)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``<folder>/<name>`` holding the owner's PID.

    Why: a run folder filled by two processes computes every cell twice and interleaves writes.
    The kernel drops a flock when its holder dies, so a crashed run never blocks the next one.
    Locks are per process: objects of one process on the same file share one lock (reference
    counted), so nested use in a process does not deadlock. ``acquire`` never waits.
    """

    _held: dict[str, list[Any]] = {}  # resolved lock path -> [file object, reference count]

    def __init__(self, folder: Path, name: str = "run.lock") -> None:
        self.path = Path(folder) / name
        self._key = str(self.path.resolve())
        self._mine = False

    def acquire(self) -> None:
        """Take the lock or raise ``LockedError`` naming the PID that holds it."""
        if self._mine:
            return
        held = FolderLock._held.get(self._key)
        if held is not None:
            held[1] += 1
            self._mine = True
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; documented
            self._mine = True
            FolderLock._held[self._key] = [None, 1]
            return
        f = open(self.path, "a+")  # noqa: SIM115 - the open file *is* the lock; closed in release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = _read_pid(self.path)
            who = f"process {pid}" if pid is not None else "another process"
            raise LockedError(f"{self.path.parent} is in use by {who} (lock {self.path}); wait for it to "
                              "finish or stop it, then resume", pid) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        FolderLock._held[self._key] = [f, 1]
        self._mine = True

    def release(self) -> None:
        """Drop this object's share of the lock; the file lock goes with the last share."""
        if not self._mine:
            return
        self._mine = False
        held = FolderLock._held.get(self._key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del FolderLock._held[self._key]
            if held[0] is not None:
                held[0].close()  # closing the descriptor releases the flock

    @property
    def locked(self) -> bool:
        return self._mine

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer
            self.release()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
