"""Reading shiftbn's safetensors files: bytes and the JSON header under ``__metadata__["shiftbn"]``.

Why: statistics files (``bn.files``) and drift-monitor files (``evaluate.drift_file``) share one
container; one reader refuses what is not such a file the same way for both: a header length beyond
``MAX_HEADER`` (an image or archive: never read whole), a truncated file, no shiftbn header, naming
what the file looks like (JSON, pickle). Format names and versions stay with each file type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_HEADER = 64 << 20
"""Bytes a safetensors header may claim; a real shiftbn header (fingerprint included) is some kB."""
META_KEY = "shiftbn"


def read_shiftbn_file(path: Path, not_ours: str, fix: str) -> tuple[dict[str, Any], bytes]:
    """``(header, data)``: the decoded shiftbn JSON header (a dict) and the whole file's bytes.

    Refusals (``ValueError``) read "<not_ours>: <why>[; it looks like ...]. <fix>", e.g. not_ours "x.stats
    is not a shiftbn statistics file", fix "Write one with ...". ``FileNotFoundError`` and folders are
    the caller's to word."""
    def refuse(why: str, data: bytes) -> ValueError:
        return ValueError(f"{not_ours}: {why}{looks_like(data)}. {fix}")

    with open(path, "rb") as f:
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


def looks_like(data: bytes) -> str:
    """What a file that is no shiftbn file seems to be, for an error message ("" when unknown)."""
    if data[:1] == b"{":
        return "; it looks like JSON"
    if data[:1] == b"\x80" or data[:2] == b"PK":
        return "; it looks like a pickle or torch.save file, which is never loaded: unpickling can run code"
    return ""
