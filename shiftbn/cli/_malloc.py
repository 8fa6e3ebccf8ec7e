"""The command's memory policy: glibc's malloc keeps freed memory for reuse instead of returning it.

Why: by default glibc serves every block above 32 MiB with its own ``mmap`` and gives it back on free,
so each forward of a large batch (a 256 x 16 x 96 x 96 activation is 150 MiB) takes fresh, zeroed pages
from the kernel. On a 2-core x86_64 VM that page-faulting cost more than the arithmetic: a plain forward
of SmallCNN on 96x96 images took 14.8 ms per sample (9.2 of them system time) against 5.4 ms with freed
memory kept (benchmarks/bench_floor.py on 20,000 Camelyon-shaped PNGs measured ``matrix`` at 2.6x its
floor before). A command runs one job and exits, so keeping its peak memory mapped costs nothing
later. Only the ``shiftbn`` process itself does this (``main`` with the real command line), never a
program that imports shiftbn; ``SHIFTBN_MALLOC=system`` keeps glibc's defaults; other C libraries (musl,
macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep freed memory; ``True`` if it took.

    Returns:
        Whether both settings were applied (``False`` off Linux/glibc or with ``SHIFTBN_MALLOC=system``).

    Example:
        >>> isinstance(keep_freed_memory(), bool)
        True
    """
    if os.environ.get("SHIFTBN_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
