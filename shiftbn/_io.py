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
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FolderLock", "LockedError", "atomic_save_torch", "atomic_write_bytes", "atomic_write_text",
           "remove_stale_temps", "same_file"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename.

    The temp file is ``.<name>.<pid>.<random>.tmp``: the writer's process id lets ``remove_stale_temps``
    tell a killed writer's leftover from a live one's. An ``OSError`` of the write names ``path`` (the
    operating system's own message does not): file-size limit (``ulimit -f``), disk full, quota. On
    any error the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:  # its message would name the temp file, not the one being written
        raise _naming(e, path, len(data)) from None
    try:
        _umask_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            raise _naming(e, path, len(data)) from None
        raise
    _fsync_dir(path.parent)


def _naming(e: OSError, path: Path, size: int) -> OSError:
    """``e`` reworded to name the file being written (the same class and errno)."""
    if e.errno == errno.EFBIG:  # Python ignores SIGXFSZ, so the limit surfaces here as EFBIG
        why = (f"the file-size limit was hit ({size:,} bytes to write; see ulimit -f) - raise the limit or write "
               "elsewhere")
    else:
        why = e.strerror or str(e) or type(e).__name__
    msg = f"cannot write {path}: {why}; nothing was written (an existing {path.name} is unchanged)"
    try:
        new = type(e)(msg)
    except Exception:  # noqa: BLE001 - an OSError subclass with its own constructor
        new = OSError(msg)
    new.errno = e.errno
    return new


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (through a symlink or a hard link), or the
    same resolved path when one does not exist yet."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        try:
            return Path(a).resolve() == Path(b).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return False


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files ``atomic_write_bytes`` left in ``folder`` (not below it) when its writer was
    killed; returns the files removed.

    Why: a SIGKILL between the temp file and the rename leaves ``.<name>.<pid>.<random>.tmp`` behind.
    Only files whose writer process is gone are removed (a live writer's, or one this process
    writes, is never touched); on a system where that cannot be checked (Windows) nothing is removed.
    Call it while holding the folder's lock, so that no writer of another machine shares the folder.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False) or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may be running; True whenever that cannot be ruled out."""
    if os.name == "nt" or pid <= 0 or pid == os.getpid():
        return True  # Windows: os.kill(pid, 0) would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: it exists, owned by someone else
        return True
    return True


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
