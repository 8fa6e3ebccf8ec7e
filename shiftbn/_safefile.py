"""Reading shiftbn's safetensors files: bytes and the JSON header under ``__metadata__["shiftbn"]``.

Why: statistics files (``bn.files``) and drift-monitor files (``evaluate.drift_file``) share one
container; one reader refuses what is not such a file the same way for both: a header length beyond
``MAX_HEADER`` (an image or archive: never read whole), a truncated file, no shiftbn header, naming
what the file looks like (JSON, pickle). Format names and versions stay with each file type.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_HEADER = 64 << 20
"""Bytes a safetensors header may claim; a real shiftbn header (fingerprint included) is some kB."""
META_KEY = "shiftbn"


def read_shiftbn_file(path: Path, not_ours: str, fix: str) -> tuple[dict[str, Any], bytes]:
    """``(header, data)``: the decoded shiftbn JSON header (a dict) and the whole file's bytes.

    Refusals (``ValueError``) read "<not_ours>: <why>[; it looks like ...]. <fix>", e.g. not_ours "x.stats
    is not a shiftbn statistics file", fix "Write one with ...". ``FileNotFoundError`` and folders are
    the caller's to word. Anything but a regular file (a FIFO, a device) is refused before a byte is read:
    reading a FIFO would wait for a writer forever, a device might never end."""
    def refuse(why: str, data: bytes) -> ValueError:
        return ValueError(f"{not_ours}: {why}{looks_like(data)}. {fix}")

    with open_regular(path, fix) as f:
        head = f.read(8)
        if len(head) == 8 and int.from_bytes(head, "little") > MAX_HEADER:
            raise refuse(f"its first bytes claim a {int.from_bytes(head, 'little'):,}-byte header", head)
        data = head + f.read()
    if len(data) < 8:
        raise refuse(f"only {len(data)} bytes (truncated?)", data)
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise refuse(f"or it is truncated: its header claims {n} bytes, {len(data) - 8} follow", data)
    try:
        outer = json.loads(data[8:8 + n].decode("utf-8"))
        header = json.loads(outer["__metadata__"][META_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise refuse(f"no readable shiftbn header ({type(e).__name__}: damaged, or written by another tool)",
                     data) from None
    if not isinstance(header, dict):
        raise refuse(f"its shiftbn header is a {type(header).__name__}, not an object", data)
    return header, data


def open_regular(path: Path, fix: str):
    """``path`` opened for binary reading, or ``ValueError`` naming it when it is no regular file.

    Why: ``open`` of a FIFO blocks until some writer opens it; opened non-blocking and checked with
    ``fstat`` on the descriptor itself, nothing can be swapped in between the check and the read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is {_kind(mode)}, not a regular file; nothing was read from it. {fix}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)", "a folder", ...)."""
    for test, words in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def is_special(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder (e.g. "a FIFO (named
    pipe)"), else None; for option checks that must not open it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _kind(mode)


def looks_like(data: bytes) -> str:
    """What a file that is no shiftbn file seems to be, for an error message ("" when unknown)."""
    if data[:1] == b"{":
        return "; it looks like JSON"
    if data[:1] == b"\x80" or data[:2] == b"PK":
        return "; it looks like a pickle or torch.save file, which is never loaded: unpickling can run code"
    return ""
