"""The command's memory policy: large blocks come from malloc's heap and stay there (no fresh pages per forward)."""

import subprocess
import sys

import pytest

from shiftbn.cli import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

PROBE = """
import ctypes, sys
from shiftbn.cli._malloc import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
x = bytearray(64 << 20)  # 64 MiB from malloc: above glibc's largest mmap threshold
print(kept, libc.mallinfo2().hblkhd >= (64 << 20))
"""


def _probe(mode: str, env: dict | None = None) -> str:
    import os

    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})}).stdout.split()


def test_a_large_block_comes_from_the_heap_once_freed_memory_is_kept():
    assert _probe("system") == ["False", "True"]  # glibc's default: its own mmap, returned on free
    assert _probe("keep") == ["True", "False"]  # kept: from the heap, reused by the next forward
    assert _probe("keep", {"SHIFTBN_MALLOC": "system"}) == ["False", "True"]  # the opt-out


def test_only_the_command_process_sets_it_never_a_caller_of_main(monkeypatch):
    import importlib

    calls = []
    monkeypatch.setattr(importlib.import_module("shiftbn.cli.main"), "keep_freed_memory", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        main(["--version"])
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["shiftbn", "--version"])
    with pytest.raises(SystemExit):
        main()
    assert calls == [1]
